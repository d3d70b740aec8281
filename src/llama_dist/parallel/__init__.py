"""The parallelism layer: meshes, FSDP2, tensor/sequence parallel, activation recomputation."""

from llama_dist.parallel.config import ACConfig, ParallelConfig
from llama_dist.parallel.fsdp import set_gradient_sync
from llama_dist.parallel.mesh import build_mesh, dp_rank_and_size, init_distributed
from llama_dist.parallel.optim import build_adamw, clip_grad_norm_
from llama_dist.parallel.parallelize import (
    build_llama,
    init_weights_parallel,
    loss_context,
    parallelize_llama,
)

__all__ = [
    "ACConfig",
    "ParallelConfig",
    "build_adamw",
    "build_llama",
    "build_mesh",
    "clip_grad_norm_",
    "dp_rank_and_size",
    "init_distributed",
    "init_weights_parallel",
    "loss_context",
    "parallelize_llama",
    "set_gradient_sync",
]
