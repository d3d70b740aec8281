"""Process groups and the device mesh ("dp_replicate", "dp_shard", "tp")."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llama_dist.parallel.config import ParallelConfig

MESH_AXES = ("dp_replicate", "dp_shard", "tp")


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(*, device: str = "auto", timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes; gloo on CPU, nccl on GPUs.

    device: "auto" (a GPU when there is one), "cpu" or "cuda". Returns this rank's device.
    Idempotent; a single process without torchrun's environment becomes a world of one.
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
    return device


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
