"""Generation on a sharded policy: through the FSDP model as it is vs a consolidated copy.

The comparison behind the Llama 2 paper's RLHF note (../shared/docs/llama2.md): generating
through FSDP-sharded weights all-gathers every layer at every decode step, which the paper
measured about 20x slower than consolidating the weights once per generation phase. Both paths
are `llama_dist.generation_dist`: (a) `generate_distributed` on the FSDP model, (b) the same
inside `consolidated_for_generation`, whose cost (one all-gather of every parameter) is timed
and counted in its tokens/s.

Each data-parallel rank generates greedily for its own prompts (different lengths, the same
number per rank), `--new-tokens` per prompt and no eos, so both paths do the same work; the
script checks they produce the same tokens. tokens/s = the new tokens of all ranks / the
phase's wall time on the slowest rank; the fastest of `--repeats` runs is kept. Peak memory:
on GPUs `torch.cuda.max_memory_allocated`; on CPU, where torch keeps no allocator statistics,
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs at the start of
the phase) over an untimed first run in a fresh process, with glibc's mmap threshold fixed so
that every tensor takes pages of its own (under torchrun, a second path's run follows the
first's and may reuse memory it freed). "extra" is the peak minus what the rank held when the
phase began (its policy shard, the process itself).

Without torchrun the script spawns `--world-size` processes itself, one fresh group per path
so that each path's memory is its own; under torchrun (nccl on GPUs) both paths run in the
launched group, one after the other:
`torchrun --nproc-per-node 8 benchmarks/generation.py --dim 4096 --n-layers 32 ...`

Command line of benchmarks/results/generation_cpu.md (about 3 minutes on 2 shared cores):
`python benchmarks/generation.py --out-md benchmarks/results/generation_cpu.md`
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llama_dist.generation_dist import consolidated_for_generation, generate_distributed
from llama_dist.models.config import LlamaConfig
from llama_dist.parallel import (
    ParallelConfig,
    build_llama,
    build_mesh,
    dp_rank_and_size,
    init_distributed,
)

PATHS = ("sharded", "consolidated")
LABELS = {
    "sharded": "(a) through the FSDP-sharded model",
    "consolidated": "(b) consolidated copy (incl. consolidation)",
}
_MIB = 2**20
# On CPU, memory is measured as the resident set. glibc serves large blocks from mmap (returned
# to the system on free) only above a threshold it raises as blocks are freed; below it, freed
# memory stays resident and is reused unseen. For the memory run, the first in a fresh process,
# a fixed threshold of 64 KiB puts every tensor in pages of its own, so the resident set follows
# the live tensors. The timed runs then get glibc's largest dynamic threshold back: page faults
# on every allocation would slow them down severalfold.
_MMAP_THRESHOLD_MEMORY = 64 * 1024
_MMAP_THRESHOLD_TIMING = 32 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def set_mmap_threshold(nbytes: int) -> bool:
    """Set glibc's mmap threshold for this process; False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


@dataclasses.dataclass
class Result:
    """One path, over all ranks (the slowest rank's times, the largest rank's memory)."""

    path: str
    new_tokens: int  # generated tokens, all ranks together
    decode_steps: int  # forwards after the prefill
    generate_s: float
    consolidate_s: float  # 0 for the sharded path
    peak_bytes: int  # cuda max_memory_allocated, or on CPU the peak resident set
    extra_bytes: int  # peak minus what was held when the phase began
    tokens_digest: str  # of every rank's tokens: equal for equal outputs

    @property
    def total_s(self) -> float:
        return self.generate_s + self.consolidate_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="generation.py", description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--n-kv-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--prompts-per-rank", type=int, default=4)
    parser.add_argument(
        "--prompt-len", type=int, default=48, help="longest prompt; others down to half of it"
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="per prompt")
    parser.add_argument("--world-size", type=int, default=2, help="without torchrun")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (no SP)")
    parser.add_argument(
        "--param-dtype", default="auto", help="FSDP compute dtype: auto = bf16 on GPU, fp32 CPU"
    )
    parser.add_argument("--repeats", type=int, default=2, help="fastest of N runs per path")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank (default: 1)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--out-md", type=Path, default=None, metavar="FILE")
    parser.add_argument(
        "--out-json", type=Path, default=None, metavar="FILE", help="the rows, machine-readable"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.n_layers, args.n_heads, args.n_kv_heads = 64, 2, 4, 2
        args.vocab_size, args.prompts_per_rank, args.prompt_len = 128, 2, 8
        args.new_tokens, args.repeats = 4, 1
    return args


def model_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        vocab_size=args.vocab_size,
        multiple_of=64,
        max_seq_len=args.prompt_len + args.new_tokens,
    ).validate()


def rank_prompts(args: argparse.Namespace, dp_rank: int) -> list[list[int]]:
    """This data-parallel rank's prompts: lengths from half the longest up to it."""
    gen = torch.Generator().manual_seed(1000 + dp_rank)
    n = args.prompts_per_rank
    shortest = max(1, args.prompt_len // 2)
    lengths = torch.linspace(shortest, args.prompt_len, n).round().long().tolist()
    return [torch.randint(args.vocab_size, (length,), generator=gen).tolist() for length in lengths]


# Memory ---------------------------------------------------------------------------------------
def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def start_peak(device: torch.device) -> int:
    """Reset the peak counter; returns what is held now: allocated bytes on GPUs, the
    resident set on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    # "5" resets the peak resident set size to the current one (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_bytes("VmRSS")


def read_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


# One path on every rank -----------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously; without this the timer stops before they finish.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_path(model, mesh, prompts, args, path: str, device: torch.device, *, new_tokens: int):
    """(tokens, decode steps, generate s, consolidate s, peak bytes, extra) of one run on this
    rank."""
    held = start_peak(device)
    dist.barrier()
    start = time.perf_counter()
    if path == "sharded":
        tokens = generate_distributed(
            model, prompts, mesh=mesh, max_new_tokens=new_tokens, temperature=0
        )
        _sync(device)
        consolidate_s, generate_s = 0.0, time.perf_counter() - start
    else:
        with consolidated_for_generation(model, mesh) as gen_model:
            _sync(device)
            consolidated = time.perf_counter()
            tokens = generate_distributed(
                gen_model, prompts, mesh=mesh, max_new_tokens=new_tokens, temperature=0
            )
            _sync(device)
            done = time.perf_counter()
        consolidate_s, generate_s = consolidated - start, done - consolidated
    peak = read_peak(device)
    steps = max(len(row) for row in tokens) - 1
    return tokens, steps, generate_s, consolidate_s, peak, peak - held


def rank_main(args: argparse.Namespace, paths: Sequence[str]) -> dict[str, dict] | None:
    """Every rank: build the FSDP policy, run `paths`; rank 0 returns the merged results."""
    device = init_distributed()
    on_cpu = device.type == "cpu"
    if on_cpu:
        torch.set_num_threads(args.threads)
        set_mmap_threshold(_MMAP_THRESHOLD_MEMORY)
    memory: dict[str, tuple[int, int]] = {}
    world = dist.get_world_size()
    cfg = model_config(args)
    pc = ParallelConfig(tp=args.tp, sequence_parallel=False, param_dtype=args.param_dtype)
    pc.validate(world, cfg)
    mesh = build_mesh(pc)
    model = build_llama(cfg, pc, mesh, device=device, seed=0).eval()
    dp_rank, _ = dp_rank_and_size(mesh)
    prompts = rank_prompts(args, dp_rank)
    out: dict[str, dict] = {}
    for path in paths:
        # The memory run first: on CPU while this process is fresh (see _MMAP_THRESHOLD_MEMORY).
        # It also keeps one-time costs (allocator growth, kernel selection) out of the timing.
        *_, peak, extra = run_path(
            model, mesh, prompts, args, path, device, new_tokens=args.new_tokens
        )
        memory[path] = (peak, extra)
        if on_cpu:
            set_mmap_threshold(_MMAP_THRESHOLD_TIMING)
        best = None
        for _ in range(args.repeats):
            run = run_path(model, mesh, prompts, args, path, device, new_tokens=args.new_tokens)
            if best is None or run[2] + run[3] < best[2] + best[3]:
                best = run
        tokens, steps, gen_s, cons_s, _, _ = best
        peak, extra = memory[path]
        gathered: list = [None] * world
        stats = (dp_rank, tokens, steps, gen_s, cons_s, peak, extra)
        dist.all_gather_object(gathered, stats)
        # tp ranks of one dp rank hold the same tokens: count them once.
        per_dp = {g[0]: g[1] for g in gathered}
        out[path] = dataclasses.asdict(
            Result(
                path=path,
                new_tokens=sum(len(row) for rows in per_dp.values() for row in rows),
                decode_steps=max(g[2] for g in gathered),
                generate_s=max(g[3] for g in gathered),
                consolidate_s=max(g[4] for g in gathered),
                peak_bytes=max(g[5] for g in gathered),
                extra_bytes=max(g[6] for g in gathered),
                tokens_digest=hashlib.sha256(
                    json.dumps(sorted(per_dp.items())).encode()
                ).hexdigest(),
            )
        )
    out["_meta"] = {
        "device": device_name(device),
        "world_size": world,
        "shard_bytes": sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
            for p in model.parameters()
        ),
        "num_params": cfg.num_params(),
        "cfg": cfg.to_dict(),
    }
    return out if dist.get_rank() == 0 else None


# Spawning -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, out_file: str, args, paths) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    try:
        result = rank_main(args, paths)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result is not None:
        Path(out_file).write_text(json.dumps(result))


def spawn(args: argparse.Namespace, paths: Sequence[str]) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "result.json")
        mp.start_processes(
            _spawned,
            args=(args.world_size, _free_port(), out_file, args, list(paths)),
            nprocs=args.world_size,
            join=True,
            start_method="spawn",
        )
        return json.loads(Path(out_file).read_text())


# Output ---------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (nccl)"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {name}, {threads} thread{'s' if threads > 1 else ''} per rank (gloo)"


def results_table(results: dict[str, Result], on_gpu: bool) -> str:
    memory = "allocated" if on_gpu else "RSS"
    lines = [
        "| path | tokens/s | total s | consolidate s | generate s | ms per forward "
        f"| peak {memory} MiB | extra MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in PATHS:
        if path not in results:
            continue
        r = results[path]
        # The prefill and the decode steps, over the forwards.
        ms_per_step = 1e3 * r.generate_s / (r.decode_steps + 1)
        lines.append(
            f"| {LABELS[path]} | {r.tokens_per_s:.1f} | {r.total_s:.2f} | {r.consolidate_s:.3f} "
            f"| {r.generate_s:.2f} | {ms_per_step:.1f} | {r.peak_bytes / _MIB:.1f} "
            f"| {r.extra_bytes / _MIB:.1f} |"
        )
    return "\n".join(lines)


def render_markdown(
    results: dict[str, Result], meta: dict, args: argparse.Namespace, argv: Sequence[str]
) -> str:
    on_gpu = "nccl" in meta["device"]
    lines = [
        "# Generation on a sharded policy: FSDP as it is vs a consolidated copy",
        "",
        f"- device: {meta['device']}, {meta['world_size']} ranks",
        f"- torch: {torch.__version__}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `python benchmarks/generation.py {shlex.join(argv)}`",
        f"- model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, "
        f"{args.n_kv_heads} kv heads, vocab {args.vocab_size}: {meta['num_params']:,} "
        f"parameters; FSDP shard per rank {meta['shard_bytes'] / _MIB:.1f} MiB; "
        f"param_dtype {args.param_dtype}; tp {args.tp}",
        f"- per rank {args.prompts_per_rank} prompts of {max(1, args.prompt_len // 2)}.."
        f"{args.prompt_len} tokens, {args.new_tokens} greedy new tokens each, no eos; fastest "
        f"of {args.repeats} run(s) after an untimed first one (the memory run)",
        f"- load average when the report was written: {os.getloadavg()[0]:.2f} (other work on "
        "the machine slows every path)",
        "- tokens/s: new tokens of all ranks / (consolidation + generation) on the slowest rank",
        "- memory, the largest rank's: "
        + (
            "torch.cuda.max_memory_allocated"
            if on_gpu
            else "peak resident set (VmHWM, reset at the start of the phase) of an untimed "
            "first run in a fresh process, glibc's mmap threshold fixed at "
            f"{_MMAP_THRESHOLD_MEMORY // 1024} KiB so that every tensor takes pages of its own"
        )
        + "; extra = peak minus what the rank held when the phase began (its policy shard, "
        "the process)",
        "",
        results_table(results, on_gpu),
        "",
    ]
    if len(results) == 2:
        sharded, consolidated = results["sharded"], results["consolidated"]
        same = sharded.tokens_digest == consolidated.tokens_digest
        lines += [
            f"- consolidated: {sharded.total_s / consolidated.total_s:.1f}x the tokens/s of "
            f"generating through the sharded model ({consolidated.consolidate_s:.3f} s of it "
            f"consolidating); generation alone {sharded.generate_s / consolidated.generate_s:.1f}x",
            f"- the two paths generated {'the same' if same else 'DIFFERENT'} tokens",
            "",
        ]
    lines += ["## Config", "", "```json", json.dumps(meta["cfg"], indent=2), "```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> tuple[dict[str, Result], str] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
    if under_torchrun:
        raw = rank_main(args, args.paths)
        if raw is None:  # not rank 0
            dist.destroy_process_group()
            return None
        dist.destroy_process_group()
    else:
        raw = {}
        for path in args.paths:
            raw.update(spawn(args, [path]))
    meta = raw.pop("_meta")
    results = {path: Result(**raw[path]) for path in args.paths}
    markdown = render_markdown(results, meta, args, argv)
    print(markdown)
    if args.out_md is not None:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(markdown)
    if args.out_json is not None:
        rows = {
            p: {**dataclasses.asdict(r), "tokens_per_s": r.tokens_per_s} for p, r in results.items()
        }
        args.out_json.write_text(json.dumps({"results": rows, "meta": meta}, indent=2))
    return results, markdown


if __name__ == "__main__":
    main()
