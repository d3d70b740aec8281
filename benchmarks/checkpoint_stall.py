"""Training stall per checkpoint save, synchronous against asynchronous (pinned staging).

    python benchmarks/checkpoint_stall.py --preset small --n-layers 4 --saves 4
    torchrun --nproc_per_node 8 benchmarks/checkpoint_stall.py --preset 7b --saves 3

Trains the model with the trainer's own pieces (FSDP2 over every rank, fused AdamW, the
CheckpointManager), saving after every `--every` steps, once with `checkpoint.async_save=false`
and once with `true`. Per mode it reports the time the step loop is blocked in `save()` (sync:
the whole write; async: staging the state into the host buffers the first save allocates,
pinned on CUDA, reused after), the step time far from a save, and the step time right after a
save (an async write runs in the background then). The first save of each mode is reported
apart: it allocates the buffers.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llama_dist.checkpoint import CheckpointManager, ModelState, OptimizerState
from llama_dist.models.config import PRESETS, get_preset
from llama_dist.parallel import ParallelConfig, build_adamw, build_llama, build_mesh
from llama_dist.parallel.mesh import init_distributed
from llama_dist.train.step import forward_backward


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--saves", type=int, default=4, help="saves per mode")
    p.add_argument("--every", type=int, default=2, help="steps between saves")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a tmp dir)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.saves < 2 or args.every < 2:
        p.error("--saves and --every must be >= 2 (the first save is reported apart)")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, cfg, mode: str, root: Path, device: torch.device) -> dict:
    parallel = ParallelConfig().validate(dist.get_world_size(), cfg)
    model = build_llama(cfg, parallel, build_mesh(parallel, device=device.type), device=device)
    optimizer = build_adamw(model, lr=1e-4)
    manager = CheckpointManager(
        root / mode, model_config=cfg, keep_last=1, async_save=mode == "async"
    )
    states = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
    g = torch.Generator().manual_seed(0)
    batch = [
        {
            "tokens": torch.randint(
                0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g
            )
        }
    ]

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        forward_backward(model, batch, parallel=parallel, device=device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    step()  # warm-up: kernels, lazy optimizer state
    stalls, plain, after = [], [], []
    n = 0
    try:
        for _ in range(args.saves):
            for i in range(args.every):
                t = step()
                (after if i == 0 and n else plain).append(t)
            n += 1
            dist.barrier()
            start = time.perf_counter()
            manager.save(n, states)
            stalls.append(time.perf_counter() - start)
        manager.wait()
    finally:
        manager.close()
    size = sum(f.stat().st_size for f in (root / mode).rglob("*") if f.is_file())
    return {
        "first": stalls[0],
        "stall": statistics.median(stalls[1:]),
        "plain": statistics.median(plain),
        "after": statistics.median(after) if after else float("nan"),
        "size": size,
    }


def main(argv=None) -> str:
    args = parse_args(argv)
    device = init_distributed()
    overrides = {} if args.n_layers is None else {"n_layers": args.n_layers}
    cfg = get_preset(args.preset, **overrides)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        if dist.get_world_size() > 1:
            shared = [str(root)]
            dist.broadcast_object_list(shared, src=0)
            root = Path(shared[0])
        results = {mode: measure(args, cfg, mode, root, device) for mode in ("sync", "async")}
    command = shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Checkpoint stall: {args.preset} ({cfg.num_params() / 1e6:,.0f}M parameters"
        f"{', ' + str(args.n_layers) + ' layers' if args.n_layers else ''}), "
        f"{dist.get_world_size()} x {device.type}"
        + (f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "",
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; command: "
        f"`python benchmarks/checkpoint_stall.py {command}`",
        "",
        "| save | checkpoint MB | first save s | stall per save s | step s | step after a save s |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        lines.append(
            f"| {mode} | {r['size'] / 1e6:,.0f} | {r['first']:.3f} | {r['stall']:.3f} | "
            f"{r['plain']:.3f} | {r['after']:.3f} |"
        )
    ratio = results["sync"]["stall"] / max(results["async"]["stall"], 1e-9)
    lines += ["", f"Async saves stall the loop {ratio:.1f}x less than synchronous ones."]
    table = "\n".join(lines)
    if dist.get_rank() == 0:
        print(table)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table + "\n")
    dist.destroy_process_group()
    return table


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        print(f"checkpoint_stall.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
