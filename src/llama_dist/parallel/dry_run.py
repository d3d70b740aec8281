"""Dry run: apply the real parallelize code to a model on the meta device with a fake process
group of any world size, and report what one rank holds.

No memory is allocated and nothing is communicated, so 70B on 2048 ranks runs on a laptop:
the shard shapes are those a real job would have.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from llama_dist.models.config import PRESETS, LlamaConfig, get_preset
from llama_dist.models.llama import Llama
from llama_dist.parallel.config import ACConfig, ParallelConfig
from llama_dist.parallel.fsdp import DTYPES, resolve_dtype
from llama_dist.parallel.mesh import build_mesh
from llama_dist.parallel.parallelize import parallelize_llama

GIB = 2**30


@dataclass
class RankMemory:
    """Bytes held by one rank between steps, and the largest FSDP all-gather."""

    num_params_local: int
    param_bytes: int  # sharded fp32 master weights
    grad_bytes: int  # sharded gradients (same dtype as the sharded parameters)
    optimizer_bytes: int  # AdamW exp_avg + exp_avg_sq
    largest_all_gather_bytes: int  # one FSDP group, unsharded over dp, in the param dtype
    largest_all_gather_group: str

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def _tp_shards(param: torch.Tensor) -> int:
    """How many tensor-parallel ranks split this parameter (1 if replicated over tp)."""
    if not isinstance(param, DTensor):
        return 1
    names = param.device_mesh.mesh_dim_names or ()
    shards = 1
    for name, placement in zip(names, param.placements, strict=True):
        if name == "tp" and isinstance(placement, Shard):
            shards *= param.device_mesh[name].size()
    return shards


def rank_memory(model: Llama, cfg: ParallelConfig, *, device_type: str = "cuda") -> RankMemory:
    """What one rank of a parallelized (meta) model holds; assumes uniform shards."""
    local = 0
    param_bytes = 0
    for p in model.parameters():
        shard = p.to_local() if isinstance(p, DTensor) else p
        local += shard.numel()
        param_bytes += shard.numel() * shard.element_size()
    gather_dtype = resolve_dtype(cfg.param_dtype, device_type=device_type)
    units = {"tok_embeddings": [model.tok_embeddings]}
    units.update({f"layers.{i}": [b] for i, b in model.layers.items()})
    units["norm+output"] = [model.norm, model.output]
    largest, largest_name = 0, ""
    for name, modules in units.items():
        size = sum(p.numel() // _tp_shards(p) for m in modules for p in m.parameters())
        size *= gather_dtype.itemsize
        if size > largest:
            largest, largest_name = size, name
    return RankMemory(
        num_params_local=local,
        param_bytes=param_bytes,
        grad_bytes=param_bytes,
        optimizer_bytes=2 * local * torch.float32.itemsize,
        largest_all_gather_bytes=largest,
        largest_all_gather_group=largest_name,
    )


def model_shape(model: str) -> LlamaConfig:
    """A preset's name, or a path: an HF config.json, a llama_dist model_config.json or a
    folder holding one."""
    from llama_dist.checkpoint.init import model_config_from_path

    if model in PRESETS:
        return get_preset(model)
    if os.sep in model or model.endswith(".json") or os.path.exists(model):
        return model_config_from_path(model)
    return get_preset(model)  # names the presets


def dry_run(model_name: str, cfg: ParallelConfig, world_size: int) -> RankMemory:
    """Parallelize `model_name` (a preset or a config file, `model_shape`) for `world_size`
    ranks on the meta device."""
    model_cfg = model_shape(model_name)
    cfg.validate(world_size, model_cfg)
    if dist.is_initialized():
        raise RuntimeError("dry_run needs a process of its own (a process group exists)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = build_mesh(cfg, device="cpu")
        with torch.device("meta"):
            model = Llama(model_cfg)
        parallelize_llama(model, mesh, cfg)
        return rank_memory(model, cfg)
    finally:
        dist.destroy_process_group()


def format_report(model_name: str, cfg: ParallelConfig, world_size: int, mem: RankMemory) -> str:
    rows = [
        ("parameters (local)", f"{mem.num_params_local:,}", mem.param_bytes),
        ("gradients", "", mem.grad_bytes),
        ("optimizer state (AdamW)", "", mem.optimizer_bytes),
        ("total", "", mem.total_bytes),
        (f"largest all-gather ({mem.largest_all_gather_group})", "", mem.largest_all_gather_bytes),
    ]
    lines = [
        f"dry run: model={model_name} world={world_size} dp_replicate={cfg.dp_replicate} "
        f"dp_shard={cfg.dp_shard} tp={cfg.tp} ac={cfg.ac.mode}",
        f"{'per rank':<40} {'count':>16} {'GiB':>10}",
    ]
    lines += [f"{name:<40} {count:>16} {b / GIB:>10.4f}" for name, count, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="70b",
        help="a preset, or an HF config.json / model_config.json / folder holding one",
    )
    parser.add_argument("--world-size", type=int, default=2048)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--dp-replicate", type=int, default=1)
    parser.add_argument("--ac", default="selective", choices=["none", "full", "selective"])
    parser.add_argument("--param-dtype", default="bf16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    cfg = ParallelConfig(
        dp_replicate=args.dp_replicate,
        tp=args.tp,
        param_dtype=args.param_dtype,
        ac=ACConfig(mode=args.ac),
    )
    try:
        mem = dry_run(args.model, cfg, args.world_size)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(format_report(args.model, cfg, args.world_size, mem))
    return 0
