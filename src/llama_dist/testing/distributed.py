"""Run a function on N CPU processes joined by gloo, from inside a test.

Launching costs seconds (each process imports torch), so tests group several checks into one
launch. Rank 0's return value comes back to the caller; any rank's exception fails the call.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def torchrun_command(nproc: int = 2) -> list[str]:
    """The start of a `torchrun --standalone --nproc_per_node N` command line, with this
    interpreter (so the test's environment is the workers')."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, init: bool
):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # Two cores and up to four ranks: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    result_path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        if init:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(*args)
        payload = ("ok", result if rank == 0 else None)
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        payload = ("error", f"rank {rank}:\n{traceback.format_exc()}")
    partial = result_path.with_suffix(".partial")
    with open(partial, "wb") as f:
        pickle.dump(payload, f)
    partial.rename(result_path)
    # Teardown comes after every rank's result is on disk (a rank that failed waits for no
    # one: the others' barrier then fails, and they leave too). Then leave without the
    # interpreter's finalization: gloo's threads can still hold tensors, and freeing them
    # while Python shuts down aborts the process now and then (SIGABRT, "terminate called
    # without an active exception"). `run_distributed` takes the results of a run whose
    # every rank wrote them, whatever its teardown did.
    try:
        if dist.is_initialized():
            if payload[0] == "ok":
                dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown only; the result is already written
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable, world_size: int, *args: Any, init: bool = True) -> Any:
    """Run `fn(*args)` on `world_size` gloo ranks; return rank 0's result.

    `fn` must be importable (a module-level function) since the workers are spawned. With
    init=False the process group is left to `fn` (torchrun's environment variables are set),
    as an entry point joins it itself.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(
                _worker,
                args=(world_size, _free_port(), out_dir, fn, args, init),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
        except mp.ProcessExitedException as e:
            # A crash after every rank wrote its result is one of teardown, not of `fn`.
            written = [(Path(out_dir) / f"rank{r}.pkl").exists() for r in range(world_size)]
            if not all(written):
                raise
            print(f"run_distributed: every rank finished; then {e}", file=sys.stderr)
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
    errors = [msg for status, msg in results if status == "error"]
    if errors:
        raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
    return results[0][1]
