"""Peak memory of HF import (initial weights) and HF export, the old path against the new.

A model of the `small` preset (94M parameters, 376 MB in fp32) is saved as an HF folder of
safetensors shards and as a llama_dist checkpoint. Each measurement then runs in fresh
processes and reports the peak RSS (VmHWM) of each rank:

- import, into 1 rank and into FSDP over 2 gloo ranks. The model is built on the meta device,
  sharded and materialised without initialisation; the high-water mark is reset there
  (/proc/self/clear_refs), so "load peak" is what loading adds above the rank's own shard.
  old: `init._load_hf_whole`, which was the only HF path before (every rank reads every tensor
  in full, one at a time, and keeps its shard; it remains for pytorch_model*.bin folders).
  new: `load_initial_weights`, DCP's HuggingFaceStorageReader reading each rank's slices.
  "read" counts the tensor elements each rank got out of the safetensors files.
- export of the checkpoint to an HF folder. old: the converter as it was, `load_model_checkpoint`
  (the whole state dict) and then, per shard, all its converted tensors before
  `safetensors.save_file`; new: `convert.export_hf_folder`, one tensor at a time.

Peak RSS includes the file pages a process maps while it reads safetensors.

    python benchmarks/hf_import_memory.py --out benchmarks/results/hf_import_memory_cpu.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from llama_dist.models import Llama, LlamaConfig, get_preset

MB = 1e6
SCRIPT = Path(__file__).resolve()


def _status() -> dict[str, float]:
    """Current and peak resident memory of this process, in MB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 / MB for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _count_reads() -> dict[str, int]:
    """Tensor elements read through safetensors by this process, by tensor name."""
    import safetensors

    import llama_dist.models.hf_adapter as hf_adapter

    counts: dict[str, int] = {}
    real = safetensors.safe_open

    def count(name: str, tensor: torch.Tensor) -> torch.Tensor:
        counts[name] = counts.get(name, 0) + tensor.numel()
        return tensor

    class Slice:
        def __init__(self, inner, name):
            self.inner, self.name = inner, name

        def __getitem__(self, index):
            return count(self.name, self.inner[index])

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    class File:
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc_info):
            return self.inner.__exit__(*exc_info)

        def get_tensor(self, name):
            return count(name, self.inner.get_tensor(name))

        def get_slice(self, name):
            return Slice(self.inner.get_slice(name), name)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    def counting_open(*args, **kwargs):
        return File(real(*args, **kwargs))

    safetensors.safe_open = counting_open
    hf_adapter.safe_open = counting_open
    return counts


# Work done in the measured processes ----------------------------------------------------------
def import_worker(folder: str, path: str) -> dict:
    import torch.distributed as dist

    from llama_dist.checkpoint import init
    from llama_dist.models.hf_adapter import read_hf_config
    from llama_dist.parallel import ParallelConfig, build_mesh, parallelize_llama

    cfg = read_hf_config(folder)
    world = dist.get_world_size()
    parallel = ParallelConfig(dp_shard=world)
    parallel.validate(world, cfg)
    mesh = build_mesh(parallel, device="cpu")
    with torch.device("meta"):
        model = Llama(cfg)
    if world > 1:
        parallelize_llama(model, mesh, parallel)
    model.to_empty(device=torch.device("cpu"))
    with torch.no_grad():
        for param in model.parameters():  # fault the shard's pages in: RSS before includes it
            param.zero_()
    counts = _count_reads()
    before = _status()["VmRSS"]
    _reset_peak()
    started = time.perf_counter()
    if path == "old":
        params = dict(model.named_parameters())
        with torch.no_grad():  # as load_initial_weights runs it
            init._load_hf_whole(params, set(params), Path(folder), cfg)
    else:
        init.load_initial_weights(model, folder)
    seconds = time.perf_counter() - started
    mine = {
        "before_mb": before,
        "peak_mb": _status()["VmHWM"],
        "read_mb": sum(counts.values()) * 4 / MB,
        "seconds": seconds,
    }
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    return {"ranks": ranks}


def _old_export(checkpoint: Path, out: Path) -> None:
    """The converter's --to-hf before streaming: the whole state dict in memory, then each
    shard's converted tensors together for safetensors' save_file."""
    from safetensors.torch import save_file

    from llama_dist.checkpoint import load_model_checkpoint
    from llama_dist.models.hf_adapter import (
        _plan_shards,
        config_to_hf,
        finish_output_folder,
        prepare_output_folder,
        to_hf_tensor,
    )

    cfg, sd = load_model_checkpoint(checkpoint)
    sizes = [(k, t.numel() * t.element_size()) for k, t in sd.items()]
    shards = _plan_shards(sizes, 5 * 2**30)
    _, tmp = prepare_output_folder(out)
    for i, keys in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}.safetensors"
        tensors = dict(to_hf_tensor(k, sd[k], cfg) for k in keys)
        tensors = {k: t.contiguous() for k, t in tensors.items()}
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        del tensors
    (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    finish_output_folder(tmp, out)


def export_case(checkpoint: str, out: str, path: str) -> dict:
    # Everything either path imports, before the measurement starts.
    import safetensors.torch  # noqa: F401

    from llama_dist.checkpoint import manager  # noqa: F401
    from llama_dist.checkpoint.convert import export_hf_folder

    before = _status()["VmRSS"]
    _reset_peak()
    started = time.perf_counter()
    if path == "old":
        _old_export(Path(checkpoint), Path(out))
    else:
        export_hf_folder(checkpoint, out)
    return {
        "ranks": [
            {
                "before_mb": before,
                "peak_mb": _status()["VmHWM"],
                "read_mb": math.nan,
                "seconds": time.perf_counter() - started,
            }
        ]
    }


def setup(cfg: LlamaConfig, work: Path, max_shard_bytes: int) -> None:
    from llama_dist.checkpoint import save_model_checkpoint
    from llama_dist.models.hf_adapter import save_hf_folder

    model = Llama(cfg)
    model.init_weights(0)
    sd = model.state_dict()
    save_hf_folder(sd, cfg, work / "hf", max_shard_bytes=max_shard_bytes)
    save_model_checkpoint(work / "ckpt", sd, cfg)


def _child(argv: list[str]) -> None:
    """One measurement, in this fresh process; prints its result as JSON."""
    from llama_dist.testing.distributed import run_distributed

    kind, work, path, ranks = argv[0], Path(argv[1]), argv[2], int(argv[3])
    if kind == "import":
        result = run_distributed(import_worker, ranks, str(work / "hf"), path)
    else:
        out = work / f"export-{path}"
        result = export_case(str(work / "ckpt"), str(out), path)
        shutil.rmtree(out)
    print(json.dumps(result))


def measure(kind: str, work: Path, path: str, ranks: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--child", kind, str(work), path, str(ranks)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# The report -----------------------------------------------------------------------------------
def table(cfg: LlamaConfig, rows: list[tuple[str, str, int, dict]]) -> str:
    model_mb = cfg.num_params() * 4 / MB
    lines = [
        "| what | path | ranks | RSS before, per rank MB | peak RSS, per rank MB "
        "| load peak above before MB | read per rank MB | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for what, path, ranks, result in rows:
        worst = max(result["ranks"], key=lambda r: r["peak_mb"])
        read = max(r["read_mb"] for r in result["ranks"])
        seconds = max(r["seconds"] for r in result["ranks"])
        lines.append(
            f"| {what} | {path} | {ranks} | {worst['before_mb']:.0f} | {worst['peak_mb']:.0f} "
            f"| {worst['peak_mb'] - worst['before_mb']:.0f} "
            f"| {'-' if math.isnan(read) else f'{read:.0f}'} | {seconds:.1f} |"
        )
    lines.append("")
    lines.append(f"The model is {model_mb:.0f} MB in fp32; per rank, the worst rank is shown.")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hf_import_memory.py", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", help="model preset (default small)")
    parser.add_argument("--n-layers", type=int, help="override the preset's layer count")
    parser.add_argument(
        "--max-shard-mb", type=float, default=100, help="HF folder shard size (default 100)"
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="import world sizes")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    cfg = get_preset(args.preset)
    if args.n_layers:
        cfg = cfg.replace(n_layers=args.n_layers)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup(cfg, work, int(args.max_shard_mb * MB))
        shards = len(list((work / "hf").glob("*.safetensors")))
        rows = []
        for ranks in args.ranks:
            for path in ("old", "new"):
                rows.append(("import", path, ranks, measure("import", work, path, ranks)))
        for path in ("old", "new"):
            rows.append(("export", path, 1, measure("export", work, path, 1)))
    header = [
        "# HF import and export: peak memory, old path vs new",
        "",
        f"- torch {torch.__version__}, python {platform.python_version()}, "
        f"{platform.machine()} CPU, {os.cpu_count()} cores; load average "
        f"{os.getloadavg()[0]:.1f}",
        f"- model: preset {args.preset}"
        + (f" with {cfg.n_layers} layers" if args.n_layers else "")
        + f" ({cfg.num_params() / 1e6:.0f}M parameters, GQA {cfg.n_heads}/{cfg.num_kv_heads}), "
        f"HF folder of {shards} safetensors shards of at most {args.max_shard_mb:g} MB; "
        "import ranks are FSDP over gloo",
        f"- command: `python benchmarks/hf_import_memory.py {' '.join(argv or sys.argv[1:])}`"
        f" ({time.perf_counter() - started:.0f} s)",
        "",
        "",
    ]
    report = "\n".join(header) + table(cfg, rows) + "\n"
    if args.out:
        args.out.write_text(report)
    print(report)
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2:])
    else:
        main()
