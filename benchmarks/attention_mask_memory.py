"""Peak memory and time of attention over packed documents: dense mask + SDPA vs FlexAttention.

One attention layer of the model (`llama_dist.models.llama.Attention`, GQA) runs on one batch
of packed documents, the mask built inside the measured step as `Llama.forward` builds it:
`document_causal_mask` (a dense bool (bsz, 1, seq, seq) tensor) for SDPA, or
`document_block_mask` (a FlexAttention BlockMask) for flex_attention. Each cell runs in a fresh
process after one warm-up step (compilation included there, not in the figures).

- CUDA: forward + backward for both; peak = `torch.cuda.max_memory_allocated` above what was
  allocated before the step.
- CPU: torch 2.13 has no FlexAttention backward on CPU, so flex rows are forward only (the
  dense mask is measured both ways). Peak = the process's resident high-water mark (VmHWM,
  reset through /proc/self/clear_refs) above its resident size before the step, with glibc's
  mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so that every large tensor freed goes back to
  the system and a later one shows up again.

    python benchmarks/attention_mask_memory.py --out benchmarks/results/attention_mask_memory_cpu.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from llama_dist.models import LlamaConfig
from llama_dist.models.llama import (
    Attention,
    document_block_mask,
    document_causal_mask,
    rope_tables,
)

MIB = 2**20
# (name, attention, flex compiled?) rows of the table, in order.
VARIANTS = {
    "dense": ("dense mask + SDPA", False),
    "flex-eager": ("FlexAttention, eager", False),
    "flex": ("FlexAttention, compiled", True),
}


@dataclass
class Cell:
    variant: str
    seq: int
    batch: int
    backward: bool
    device: str
    dim: int
    n_heads: int
    n_kv_heads: int
    max_doc: int
    repeats: int
    threads: int


@dataclass
class Result:
    cell: Cell
    num_documents: int
    peak_bytes: int
    ms: float


def document_ids(batch: int, seq: int, max_doc: int, seed: int = 0) -> torch.Tensor:
    """(batch, seq) ids of packed documents of random lengths in [1, max_doc]; a row's last
    document is cut at the row's end, as packing does."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = torch.randint(1, max_doc + 1, (seq,), generator=gen)
        ids = torch.repeat_interleave(torch.arange(seq), lengths)[:seq]
        rows.append(ids)
    return torch.stack(rows)


def resident_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(cell: Cell) -> Result:
    """One cell, in this process: warm-up step, then the measured ones."""
    torch.manual_seed(0)
    device = torch.device(cell.device)
    if device.type == "cpu":
        torch.set_num_threads(cell.threads)
    cfg = LlamaConfig(
        dim=cell.dim,
        n_layers=1,
        n_heads=cell.n_heads,
        n_kv_heads=cell.n_kv_heads,
        vocab_size=256,
        max_seq_len=cell.seq,
    ).validate()
    layer = Attention(cfg).to(device)
    cos, sin = rope_tables(cfg.head_dim, cell.seq, cfg.rope_theta, cfg.rope_scaling, device=device)
    ids = document_ids(cell.batch, cell.seq, cell.max_doc).to(device)
    x = torch.randn(cell.batch, cell.seq, cell.dim, device=device, requires_grad=cell.backward)
    flex = cell.variant != "dense"
    compiled = VARIANTS[cell.variant][1]
    if flex and not compiled and device.type == "cuda":
        raise ValueError("flex-eager is a CPU row: on CUDA the model always compiles flex")

    # On CUDA Attention compiles flex_attention itself; on CPU it runs it eagerly unless the
    # layer is compiled (as per-block compile does).
    run = torch.compile(layer) if compiled and device.type == "cpu" else layer

    # Forward-only rows keep no autograd graph (CPU FlexAttention refuses inputs needing grad).
    @torch.set_grad_enabled(cell.backward)
    def step() -> None:
        # Built inside the step, as Llama.forward builds it for every batch.
        if flex:
            mask = document_block_mask(ids, compiled=compiled)
        else:
            mask = document_causal_mask(ids)
        out = run(x, cos, sin, mask)
        if cell.backward:
            out.sum().backward()
            x.grad = None
            layer.zero_grad(set_to_none=True)

    step()  # warm-up: compilation, first-touch allocations
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        base = resident_bytes("VmRSS")
    times = []
    for _ in range(cell.repeats):
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resident_bytes("VmHWM")
    return Result(cell, int(ids[:, -1].add(1).sum()), peak - base, 1000 * min(times))


def run_cell(cell: Cell) -> Result:
    """`measure(cell)` in a fresh process, so high-water marks and compile state are its own."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(cell.threads))
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(asdict(cell))],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"cell {cell} failed:\n{proc.stderr[-4000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return Result(Cell(**data["cell"]), data["num_documents"], data["peak_bytes"], data["ms"])


@dataclass
class Report:
    results: list[Result]
    markdown: str


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--n-kv-heads", type=int, default=2)
    parser.add_argument("--max-doc", type=int, default=512, help="longest packed document")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (the minimum kept)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="seq 256, 1 repeat (a smoke test)")
    parser.add_argument("--out", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    if args.worker:
        result = measure(Cell(**json.loads(args.worker)))
        print(json.dumps(asdict(result)))
        return Report([result], "")
    if args.quick:
        args.seqs, args.repeats = [256], 1
    cuda = args.device == "cuda"
    variants = [v for v in args.variants if not (cuda and v == "flex-eager")]

    started = time.time()
    results = []
    for seq in args.seqs:
        for variant in variants:
            passes = [True] if cuda or variant == "dense" else []
            passes += [] if cuda else [False]
            for backward in passes:
                cell = Cell(
                    variant,
                    seq,
                    args.batch,
                    backward,
                    args.device,
                    args.dim,
                    args.n_heads,
                    args.n_kv_heads,
                    args.max_doc,
                    args.repeats,
                    args.threads,
                )
                results.append(run_cell(cell))
                print(row(results[-1]), flush=True)

    head_dim = args.dim // args.n_heads
    command = "python benchmarks/attention_mask_memory.py " + " ".join(argv or sys.argv[1:])
    lines = [
        "# Attention over packed documents: dense mask + SDPA vs FlexAttention BlockMask",
        "",
        f"- torch {torch.__version__}, python {platform.python_version()}, "
        f"{torch.cuda.get_device_name() if cuda else platform.machine() + ' CPU'}"
        + ("" if cuda else f", {args.threads} thread(s)"),
        f"- command: `{command.strip()}`",
        f"- one attention layer: dim {args.dim}, {args.n_heads} query heads, {args.n_kv_heads} "
        f"kv heads (GQA), head_dim {head_dim}, fp32, batch {args.batch}; packed documents of "
        f"1..{args.max_doc} tokens; the mask is built inside the measured step",
        "- peak: "
        + (
            "`torch.cuda.max_memory_allocated` above the memory allocated before the step"
            if cuda
            else "resident high-water mark (VmHWM) above the resident size before the step, "
            "fresh process per row, glibc mmap threshold fixed at 64 KiB"
        ),
        "- time: the fastest of the timed steps, after one warm-up (compilation not counted)",
    ]
    if not cuda:
        lines.append(
            "- CPU: torch 2.13 has no FlexAttention backward on CPU, so the flex rows are "
            "forward only; compare them with the dense forward rows"
        )
    lines += [
        "",
        "| seq | documents | dense mask bytes (bsz x seq x seq bool) | attention | pass "
        "| peak MiB | ms |",
        "|---:|---:|---:|---|---|---:|---:|",
    ]
    lines += [row(r) for r in results]
    lines += ["", f"Total {time.time() - started:.0f} s."]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if args.out:
        with open(args.out, "w") as f:
            f.write(markdown)
    return Report(results, markdown)


def row(r: Result) -> str:
    c = r.cell
    mask_bytes = c.batch * c.seq * c.seq
    return (
        f"| {c.seq} | {r.num_documents} | {mask_bytes:,} ({mask_bytes / MIB:.2f} MiB) | "
        f"{VARIANTS[c.variant][0]} | {'fwd+bwd' if c.backward else 'fwd'} | "
        f"{r.peak_bytes / MIB:.1f} | {r.ms:.1f} |"
    )


if __name__ == "__main__":
    main()
