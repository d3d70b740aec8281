"""Pretraining data start-up per rank, the previous path against the current one.

    python benchmarks/data_startup.py --out benchmarks/results/data_startup_cpu.md

Writes synthetic Megatron indexed datasets of `--docs` documents (the .bin and .idx written
directly with numpy in megatron-core's layout, plus a `PREFIX.meta.json` sidecar; short
documents, so 1e8 of them take 3.6 GB), then times the start-up of every rank of a gloo
group, in fresh processes, for each path:

- old: what the previous `PretrainData` did on every rank: without a sidecar, a scan of the
  whole .bin for its token range (`indexed._token_range`); at the first sample of every
  epoch (inside the step loop), a permutation of the epoch's samples
  (`np.random.default_rng(...).permutation`, int64). Reproduced here, since the code is gone.
- new: `PretrainData(...)` (the checks made before any process group) and
  `PretrainData.prepare(one epoch)`: rank 0 builds the epoch's indices with Megatron's
  GPTDataset into an empty cache while the others wait, then every rank maps them ("cold",
  a job's first start); the same with that cache ("warm", every later start or restart); and
  the cold start of data without a sidecar (each rank scans 1/world of the .bin).

The first corpus runs at 1 and `--ranks` ranks, the others at 1. Peak RSS is the resident
high-water mark (VmHWM, reset through /proc/self/clear_refs) above the resident size before
the path starts, with glibc's mmap threshold fixed so that large arrays freed go back to the
system; memory-mapped pages a rank touches count in it. Files are read from the page cache
(they were just written), so the scan rate here is a lower bound on the real cost. The table
then extrapolates the largest corpus to 2T tokens on 2048 ranks (see `extrapolate`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 2**20
VOCAB = 32000
EOS = 2
SEQ_LEN = 32  # 8-token documents at seq 32: ~4 documents per sample, as 1000 at 4096
DOC_LENGTHS = (4, 12)  # uniform, inclusive: 8 tokens on average
SEED = 1234
# Extrapolation target: Llama 2's corpus and a 2048-GPU job.
TARGET_TOKENS = 2e12
TARGET_RANKS = 2048
TARGET_SEQ_LEN = 4096
TARGET_TOKENS_PER_DOC = 1000  # assumed; sets the document count (2e9)
PATHS = ("old", "old-scan", "new-cold", "new-warm", "new-scan-cold")
LABELS = {
    "old": "old, sidecar: permutation",
    "old-scan": "old, no sidecar: scan + permutation",
    "new-cold": "new, sidecar, cold cache",
    "new-warm": "new, sidecar, warm cache",
    "new-scan-cold": "new, no sidecar, cold cache",
}


def write_corpus(prefix: Path, num_docs: int, *, seed: int = 0) -> dict:
    """PREFIX.bin/.idx in megatron-core's layout (one sequence per document) + sidecar."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(DOC_LENGTHS[0], DOC_LENGTHS[1] + 1, size=num_docs, dtype=np.int32)
    chunk = 10_000_000
    with open(f"{prefix}.bin", "wb") as f:
        for start in range(0, num_docs, chunk):
            part = lengths[start : start + chunk]
            tokens = rng.integers(3, VOCAB, size=int(part.sum()), dtype=np.uint16)
            tokens[np.cumsum(part, dtype=np.int64) - 1] = EOS
            tokens.tofile(f)
    pointers = np.zeros(num_docs, dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(np.uint16).itemsize
    with open(f"{prefix}.idx", "wb") as f:
        # _IndexWriter: header, version 1, dtype code (8: uint16), sequence and document
        # counts (the document indices have one more entry than documents), then the arrays.
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))
        f.write(struct.pack("<Q", num_docs) + struct.pack("<Q", num_docs + 1))
        lengths.tofile(f)
        pointers.tofile(f)
        np.arange(num_docs + 1, dtype=np.int64).tofile(f)
    num_tokens = int(lengths.sum(dtype=np.int64))
    meta = {
        "vocab_size": VOCAB,
        "eos_id": EOS,
        "bos_id": 1,
        "bos": False,
        "num_documents": num_docs,
        "num_tokens": num_tokens,
        "max_token_id": VOCAB - 1,
        "dtype": "uint16",
        "tokenizer": None,
    }
    Path(f"{prefix}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    # The same data without a sidecar: links to the .bin and .idx only.
    bare = Path(f"{prefix}_bare")
    for suffix in (".bin", ".idx"):
        os.symlink(f"{prefix}{suffix}", f"{bare}{suffix}")
    return meta


# Per rank ----------------------------------------------------------------------------------
def _resident(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current VmRSS
    return _resident("VmRSS")


def _old_startup(prefix: str, *, scan: bool) -> dict:
    from llama_dist.data import indexed

    source = indexed.TokenSource(prefix, vocab_size=VOCAB, seq_len=SEQ_LEN)
    timings = {}
    if scan:
        started = time.perf_counter()
        indexed._token_range(source.tokens)
        timings["scan_s"] = time.perf_counter() - started
    started = time.perf_counter()
    permutation = np.random.default_rng([SEED, 0, 0]).permutation(source.num_train)
    timings["permutation_s"] = time.perf_counter() - started
    del permutation
    return timings


def _new_startup(prefix: str, cache: str) -> dict:
    from llama_dist.data.config import DataConfig
    from llama_dist.data.indexed import PretrainData

    started = time.perf_counter()
    cfg = DataConfig(paths=[prefix], seq_len=SEQ_LEN, valid_fraction=0.0, seed=SEED)
    data = PretrainData(cfg, vocab_size=VOCAB, cache_dir=cache)
    checked = time.perf_counter()
    data.prepare(data.sources[0].num_train)
    data.train_sample(0)
    return {"check_s": checked - started, "prepare_s": time.perf_counter() - checked}


def rank_worker(prefix: str, cache_root: str) -> list[dict]:
    """Every path in turn on this rank; returns every rank's records (on each rank)."""
    import torch.distributed as dist
    from megatron.core.datasets import gpt_dataset  # noqa: F401 - imports are not start-up

    from llama_dist.data import indexed  # noqa: F401

    rank, world = dist.get_rank(), dist.get_world_size()
    bare = prefix + "_bare"
    records = []
    for path in PATHS:
        dist.barrier()
        baseline = _reset_peak()
        started = time.perf_counter()
        if path == "old":
            detail = _old_startup(prefix, scan=False)
        elif path == "old-scan":
            detail = _old_startup(bare, scan=True)
        elif path in ("new-cold", "new-warm"):
            detail = _new_startup(prefix, f"{cache_root}/sidecar")
        else:
            detail = _new_startup(bare, f"{cache_root}/bare")
        seconds = time.perf_counter() - started
        peak = _resident("VmHWM") - baseline
        records.append(
            {"path": path, "rank": rank, "world": world, "seconds": seconds,
             "peak_mib": peak / MIB, "baseline_mib": baseline / MIB, **detail}
        )  # fmt: skip
    gathered: list = [None] * world
    dist.all_gather_object(gathered, records)
    return [r for rank_records in gathered for r in rank_records]


# Driver ------------------------------------------------------------------------------------
def cache_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.npy"))


def measure(prefix: Path, world: int, workdir: Path) -> tuple[list[dict], int]:
    from llama_dist.testing.distributed import run_distributed

    cache_root = workdir / f"cache-{prefix.name}-{world}"
    records = run_distributed(rank_worker, world, str(prefix), str(cache_root))
    size = cache_bytes(cache_root / "sidecar")
    shutil.rmtree(cache_root)
    return records, size


def summarize(records: list[dict]) -> dict[str, dict]:
    """Per path: rank 0's figures and the slowest / largest of the other ranks."""
    out = {}
    for path in PATHS:
        rows = [r for r in records if r["path"] == path]
        zero = next(r for r in rows if r["rank"] == 0)
        others = [r for r in rows if r["rank"] != 0]
        out[path] = {
            "rank0_s": zero["seconds"],
            "rank0_mib": zero["peak_mib"],
            "others_s": max((r["seconds"] for r in others), default=None),
            "others_mib": max((r["peak_mib"] for r in others), default=None),
            "baseline_mib": zero["baseline_mib"],
            "detail": {k: v for k, v in zero.items() if k.endswith("_s") and k != "seconds"},
        }
    return out


def extrapolate(ref: dict, summary: dict[str, dict], *, samples: int) -> list[list[str]]:
    """The largest corpus scaled to 2T tokens on 2048 ranks. Scans scale with tokens, the
    old permutation with samples (seq 4096), the new build with documents (and samples: the
    synthetic corpus has ~4 documents per sample, as 1000-token documents at seq 4096 have);
    mapping a cached index does not grow (compare the corpora above)."""
    tokens, docs = ref["num_tokens"], ref["num_documents"]
    target_docs = TARGET_TOKENS / TARGET_TOKENS_PER_DOC
    target_samples = TARGET_TOKENS / TARGET_SEQ_LEN
    by_tokens, by_samples, by_docs = (
        TARGET_TOKENS / tokens,
        target_samples / samples,
        (target_docs / docs),
    )
    old, old_scan = summary["old"], summary["old-scan"]
    cold, warm = summary["new-cold"], summary["new-warm"]
    scan_s = old_scan["detail"]["scan_s"] * by_tokens
    perm_s = old["detail"]["permutation_s"] * by_samples
    perm_gib = old["rank0_mib"] * by_samples / 1024
    build_s = cold["detail"]["prepare_s"] * by_docs
    build_gib = cold["rank0_mib"] * by_docs / 1024
    map_s = warm["rank0_s"]
    share_scan_s = scan_s / TARGET_RANKS
    tb = TARGET_TOKENS * 2 / 1e12  # uint16
    mapped_gib = warm["rank0_mib"] / 1024
    return [
        ["old, sidecar", f"{perm_s:.0f}", f"{perm_s:.0f}", f"{perm_gib:.1f}", f"{perm_gib:.1f}",
         "0", "the permutation again at every epoch boundary, inside the step loop"],
        ["old, no sidecar", f"{scan_s + perm_s:,.0f}", f"{scan_s + perm_s:,.0f}",
         f"{perm_gib:.1f}", f"{perm_gib:.1f}", f"{tb:.0f} TB",
         f"{tb * TARGET_RANKS / 1000:,.0f} PB read by the job at every start"],
        ["new, cold cache", f"{build_s:.0f}", f"{build_s + map_s:.0f} (waiting)",
         f"{build_gib:.1f}", f"{mapped_gib:.1f}", "0",
         "once per job and cache; the others wait up to data.build_timeout_s"],
        ["new, warm cache", f"{map_s:.1f}", f"{map_s:.1f}", f"{mapped_gib:.1f}",
         f"{mapped_gib:.1f}", "0", "every restart, and later jobs sharing data.cache_dir"],
        ["new, no sidecar, cold cache", f"{build_s + share_scan_s:.0f}",
         f"{build_s + share_scan_s + map_s:.0f} (waiting)", f"{build_gib:.1f}",
         f"{mapped_gib:.1f}", f"{tb * 1e3 / TARGET_RANKS:.1f} GB (1/{TARGET_RANKS})",
         "the range is cached: a warm start reads nothing"],
    ]  # fmt: skip


def reference_run(runs: list[dict]) -> dict:
    """The largest corpus measured on one rank: the base of the extrapolation."""
    return next(r for r in reversed(runs) if r["world"] == 1)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(runs: list[dict], extrapolated: list[list[str]], command: str) -> str:
    import torch

    lines = [
        "# Data start-up per rank: old path vs new (Megatron indices built once, mapped)",
        "",
        f"- torch {torch.__version__}, numpy {np.__version__}, python "
        f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs "
        f"(load average {os.getloadavg()[0]:.1f} at the end)",
        f"- command: `{command}`",
        f"- synthetic corpora: documents of {DOC_LENGTHS[0]}..{DOC_LENGTHS[1]} uint16 tokens "
        f"(8 on average), seq_len {SEQ_LEN}, one epoch prepared; files in the page cache",
        "- seconds: this rank's start-up wall time (for the other ranks of a cold start, "
        "waiting for rank 0 included); peak: VmHWM above the resident size before it, MiB",
        "",
        "| documents | tokens | samples | ranks | path | rank 0 s | other ranks s (max) | "
        "rank 0 peak MiB | other ranks peak MiB (max) | where rank 0's time goes |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        for path, s in run["summary"].items():
            detail = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in s["detail"].items())
            lines.append(
                f"| {run['docs']:.0e} | {run['tokens']:,} | {run['samples']:,} | "
                f"{run['world']} | {LABELS[path]} | {_fmt(s['rank0_s'])} | "
                f"{_fmt(s['others_s'])} | {_fmt(s['rank0_mib'], 1)} | "
                f"{_fmt(s['others_mib'], 1)} | {detail} |"
            )
    ref = reference_run(runs)
    lines += [
        "",
        "Index files of one epoch (cache): "
        + ", ".join(
            f"{r['docs']:.0e} documents {r['cache_bytes'] / MIB:,.0f} MiB"
            for r in runs
            if r["world"] == 1
        ),  # fmt: skip
        "",
        f"## Extrapolated: 2T tokens, {TARGET_RANKS} ranks, seq_len {TARGET_SEQ_LEN}",
        "",
        f"From the {ref['docs']:.0e}-document corpus on 1 rank, scaled linearly: scans by "
        f"tokens (x{TARGET_TOKENS / ref['tokens']:,.0f}), the old permutation by samples "
        f"({TARGET_TOKENS / TARGET_SEQ_LEN:.3g}), the new build by documents "
        f"({TARGET_TOKENS / TARGET_TOKENS_PER_DOC:.0e}, assuming {TARGET_TOKENS_PER_DOC} "
        "tokens each, one dataset prefix); mapping a cached index does not grow. Scans at "
        "this machine's page-cache rate: from a shared filesystem, with 2048 readers, far "
        "slower.",
        "",
        "| path | rank 0 s | each other rank s | rank 0 peak GiB | other ranks peak GiB | "
        ".bin read per rank | when |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in extrapolated]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    p.add_argument("--ranks", type=int, default=8, help="ranks for the first corpus (and 1)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if any(d < 100 for d in args.docs) or args.ranks < 1:
        p.error("--docs must each be >= 100 and --ranks >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/data_startup.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    # Large frees go back to the system, so each path's peak is its own (set before the
    # ranks are spawned: glibc reads it at start).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="data_startup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for i, docs in enumerate(args.docs):
            prefix = workdir / f"corpus_{int(docs)}"
            started = time.perf_counter()
            meta = write_corpus(prefix, int(docs))
            print(f"wrote {prefix} ({time.perf_counter() - started:.0f}s)", flush=True)
            samples = (meta["num_tokens"] - 1) // SEQ_LEN
            for world in [1, args.ranks] if i == 0 and args.ranks > 1 else [1]:
                records, size = measure(prefix, world, workdir)
                runs.append({
                    "docs": docs, "tokens": meta["num_tokens"], "samples": samples,
                    "world": world, "summary": summarize(records), "cache_bytes": size,
                    "meta": meta,
                })  # fmt: skip
                print(json.dumps(runs[-1]["summary"], indent=1), flush=True)
            for suffix in (".bin", ".idx", ".meta.json", "_bare.bin", "_bare.idx"):
                Path(f"{prefix}{suffix}").unlink()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    ref = reference_run(runs)
    extrapolated = extrapolate(ref["meta"], ref["summary"], samples=ref["samples"])
    text = render(runs, extrapolated, command)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
