"""Activation memory per recomputation policy: measured against the planner's formulas.

For each model shape, dtype, layout and policy (none / selective / full), one training step's
forward pass runs under MemTracker; the bytes alive after it (what backward will use) are
compared with `llama_dist.planner.memory`'s per-tensor formulas, which follow the method of
Korthikanti et al. (2022). For reference the table also gives that paper's GPT-layer formula
(34 s b h + 5 a s^2 b bytes per layer in 16-bit, 34 s b h with selective recomputation,
2 s b h with full), which a Llama layer with flash attention and SwiGLU does not follow.

    python benchmarks/activation_memory.py --out benchmarks/results/activation_memory_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass

import torch

from llama_dist.models import LlamaConfig, get_preset
from llama_dist.parallel import ACConfig, ParallelConfig
from llama_dist.planner.measure import formula_kept, measure_parallel, measure_single
from llama_dist.planner.memory import layer_activation_bytes
from llama_dist.testing.distributed import run_distributed

POLICIES = ("none", "selective", "full")
MIB = 2**20


@dataclass(frozen=True)
class Case:
    name: str
    cfg: LlamaConfig
    dtype: torch.dtype
    batch: int
    seq: int


def cases(full_width: bool) -> list[Case]:
    gqa = LlamaConfig(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=2048, max_seq_len=512
    )
    out = [
        Case("GQA 256-wide, 4 layers", gqa, torch.float32, 4, 256),
        Case("GQA 256-wide, 4 layers", gqa, torch.bfloat16, 4, 256),
        Case("tiny preset", get_preset("tiny"), torch.bfloat16, 2, 256),
    ]
    if full_width:
        out += [
            Case("7b, 1 layer", get_preset("7b").replace(n_layers=1), torch.bfloat16, 1, 1024),
            Case("70b, 1 layer", get_preset("70b").replace(n_layers=1), torch.bfloat16, 1, 512),
        ]
    return out


def korthikanti_gpt(cfg: LlamaConfig, *, batch: int, seq: int, p: int, ac: str) -> float:
    """The paper's bytes per GPT layer (scaled from 16-bit to p bytes), times the layers."""
    s, b, h, a = seq, batch, cfg.dim, cfg.n_heads
    per_layer = {"none": 34 * s * b * h + 5 * a * s * s * b, "selective": 34 * s * b * h}.get(
        ac, 2 * s * b * h
    )
    return per_layer * p / 2 * cfg.n_layers


def tp_worker(cfg: LlamaConfig, batch: int, seq: int) -> list[tuple]:
    rows = []
    for sp in (True, False):
        for ac in POLICIES:
            pc = ParallelConfig(tp=2, sequence_parallel=sp, ac=ACConfig(mode=ac))
            kept, _ = measure_parallel(cfg, pc, batch=batch, seq=seq)
            rows.append((sp, ac, kept))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the report to this .md file")
    parser.add_argument(
        "--no-full-width", action="store_true", help="skip the 7b / 70b single-layer cases"
    )
    parser.add_argument(
        "--quick", action="store_true", help="only the small fp32 case, one process (a smoke test)"
    )
    args = parser.parse_args(argv)

    started = time.time()
    lines = [
        "# Activation memory per recomputation policy: measured vs formula",
        "",
        f"- torch {torch.__version__}, python {platform.python_version()}, "
        f"{platform.machine()} CPU; MemTracker, bytes alive after the forward pass",
        "- formula: `llama_dist.planner.memory` (kept per layer and outside the layers); "
        "Korthikanti GPT: the paper's GPT-layer formula at the same s, b, h, a",
        "",
        "| model | dtype | batch x seq | layout | AC | measured MiB | formula MiB "
        "| measured / formula | formula, layers only MiB | Korthikanti GPT layers MiB |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    worst = 0.0

    def row(case: Case, layout: str, ac: str, kept: float, tp: int = 1, sp: bool = True):
        nonlocal worst
        p = case.dtype.itemsize
        size = dict(batch=case.batch, seq=case.seq, p=p, ac=ac)
        expected = formula_kept(case.cfg, tp=tp, sp=sp, **size)
        layers = case.batch * case.seq * case.cfg.n_layers
        layers *= layer_activation_bytes(case.cfg, p=p, tp=tp, sp=sp, ac=ac)
        gpt = korthikanti_gpt(case.cfg, **size) / tp
        worst = max(worst, abs(kept / expected - 1))
        dtype = str(case.dtype).removeprefix("torch.")
        lines.append(
            f"| {case.name} | {dtype} | {case.batch} x {case.seq} | {layout} | {ac} | "
            f"{kept / MIB:.2f} | {expected / MIB:.2f} | {kept / expected:.4f} | "
            f"{layers / MIB:.2f} | {gpt / MIB:.2f} |"
        )
        print(lines[-1], flush=True)

    for case in cases(False)[:1] if args.quick else cases(not args.no_full_width):
        for ac in POLICIES:
            kept, _ = measure_single(
                case.cfg, dtype=case.dtype, ac=ac, batch=case.batch, seq=case.seq
            )
            row(case, "1 process", ac, kept)

    tp_case = cases(False)[0]
    tp_rows = (
        [] if args.quick else run_distributed(tp_worker, 2, tp_case.cfg, tp_case.batch, tp_case.seq)
    )
    for sp, ac, kept in tp_rows:
        row(tp_case, f"tp 2{' + sp' if sp else ''} (per rank)", ac, kept, tp=2, sp=sp)

    lines += [
        "",
        f"Largest deviation from the formulas: {100 * worst:.3f}% ({time.time() - started:.0f} s).",
    ]
    text = "\n".join(lines)
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if worst < 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
