"""Process groups and the device mesh ("dp_replicate", "dp_shard", "tp")."""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llama_dist.parallel.config import ParallelConfig

MESH_AXES = ("dp_replicate", "dp_shard", "tp")
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
# The longest the check after a timed-out collective waits for the other ranks.
_CHECK_TIMEOUT_S = 60.0


@dataclass
class _Watch:
    """What `explain_collective_timeout` needs: the timeout the group was made with and, on
    gloo, a group of its own for the check (the default one may hold half-done messages)."""

    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    group: dist.ProcessGroup | None = None


_watch = _Watch()


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(
    *, device: str = "auto", timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
) -> torch.device:
    """Join the process group torchrun describes; gloo on CPU, nccl on GPUs.

    device: "auto" (a GPU when there is one), "cpu" or "cuda". Returns this rank's device.
    timeout_s: how long a collective may wait for the other ranks before it fails (see
    `explain_collective_timeout`). Idempotent; a single process without torchrun's
    environment becomes a world of one.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r} must be auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    on_gpu = torch.cuda.is_available() if device == "auto" else device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":
            # A process of its own: any free port, so that two such runs on one machine
            # (or one beside a torchrun job on the default port) do not collide.
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            timeout=timeout,
            device_id=device if on_gpu else None,
            **_restart_safe_store(timeout),
        )
        _watch.timeout_s = timeout_s
        _watch.group = None
        if not on_gpu and dist.get_world_size() > 1:
            _watch.group = dist.new_group(backend="gloo", timeout=timeout)
    return device


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than the process group's timeout."""


def explain_collective_timeout(error: BaseException) -> CollectiveTimeout | None:
    """If `error` is a collective that timed out, the error to raise instead: it names the
    ranks that stopped answering, where torch can tell. Every rank that timed out calls this
    (the check is collective); None for other errors.

    On gloo (CPU) the timeout says only "Timed out waiting Nms for recv operation"; the ranks
    then meet at `dist.monitored_barrier` on a group of their own, which rank 0 reports
    rank by rank. On NCCL the watchdog ends the process before Python sees an error; its log
    line "[Rank N] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=...)" names
    the collective on every rank, and TORCH_NCCL_DUMP_ON_TIMEOUT=1 with
    TORCH_NCCL_TRACE_BUFFER_SIZE=2000 writes traces that
    `python -m torch.distributed.flight_recorder.fr_trace` turns into the ranks that missed it.
    """
    if not dist.is_initialized() or "timed out" not in str(error).lower():
        return None
    timeout_s = _watch.timeout_s
    what = (
        f"rank {dist.get_rank()}: a collective waited longer than the {timeout_s:g} s "
        "timeout (train.collective_timeout_s)"
    )
    fix = (
        "Raise train.collective_timeout_s if a step, evaluation or save legitimately takes "
        "longer; otherwise look at what that rank was doing (stack: py-spy dump --pid PID)"
    )
    if _watch.group is None:
        return CollectiveTimeout(f"{what}: {error}. {fix}")
    check_s = min(timeout_s, _CHECK_TIMEOUT_S)
    try:
        dist.monitored_barrier(
            group=_watch.group, timeout=datetime.timedelta(seconds=check_s), wait_all_ranks=True
        )
    except RuntimeError as check:
        if dist.get_rank() == 0:
            ranks = _failed_ranks(str(check))
            if ranks is None:
                who = f"the check of every rank that followed failed too ({check})"
            else:
                who = f"rank{'s' if ',' in ranks else ''} {ranks} stopped answering"
        else:
            who = (
                "rank 0 did not answer the check that followed (it is stalled, or it is "
                "waiting for another rank: rank 0's error names them)"
            )
        return CollectiveTimeout(f"{what}; {who} (no reply within {check_s:g} s). {fix}")
    return CollectiveTimeout(
        f"{what}; every rank answered the check that followed, so none is dead: one was "
        f"slower than the timeout, or the ranks were in different collectives. {fix}"
    )


def _failed_ranks(message: str) -> str | None:
    # gloo: "[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 2000 ms"
    match = re.search(r"Ranks? ([\d, ]+) failed to pass", message)
    return match.group(1).strip().rstrip(",") if match else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _restart_safe_store(timeout: datetime.timedelta) -> dict:
    """Under torchrun the workers share the agent's store, which outlives a restart together
    with the previous attempt's keys: a new rank can read a dead peer's address and fail to
    connect. Each attempt gets its own key namespace."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    return {
        "store": dist.PrefixStore(f"llama_dist/attempt{restart}", base),
        "rank": int(os.environ["RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
    }


def build_mesh(cfg: ParallelConfig, *, device: str | None = None) -> DeviceMesh:
    """The 3-D mesh of a validated config; axes of size 1 are kept so names always resolve."""
    shape = (cfg.dp_replicate, cfg.dp_shard, cfg.tp)
    world = dist.get_world_size()
    if cfg.dp_replicate * cfg.dp_shard * cfg.tp != world:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} does not cover the world size "
            f"{world}; call ParallelConfig.validate(world_size, model) first"
        )
    return init_device_mesh(device or device_type(), shape, mesh_dim_names=MESH_AXES)


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP shards over: 2-D (replicate, shard) for HSDP, else the shard axis."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def dp_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    """This rank's index among the data-parallel ranks (which read different data)."""
    rep, shard = mesh["dp_replicate"], mesh["dp_shard"]
    return rep.get_local_rank() * shard.size() + shard.get_local_rank(), rep.size() * shard.size()
