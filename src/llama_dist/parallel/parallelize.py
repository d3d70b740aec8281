"""One function parallelizes a Llama; one helper builds it identically on any layout."""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

from llama_dist.models.config import LlamaConfig
from llama_dist.models.llama import Llama, init_param_
from llama_dist.parallel.ac import apply_ac
from llama_dist.parallel.config import ParallelConfig
from llama_dist.parallel.fsdp import apply_fsdp, resolve_dtype
from llama_dist.parallel.mesh import dp_mesh
from llama_dist.parallel.tp import apply_tp


def parallelize_llama(model: Llama, mesh: DeviceMesh, cfg: ParallelConfig) -> Llama:
    """Apply, in this order and in place: tensor/sequence parallel plan, activation
    recomputation, per-block torch.compile, FSDP2.

    The order matters: TP must see plain modules; recomputation must wrap the TP-sharded
    block; compile must see the recomputed region so it can fuse it; FSDP goes last so its
    all-gathers and reduce-scatters hook around the (compiled) blocks. `cfg` is validated.
    """
    if cfg.tp > 1:
        apply_tp(
            model,
            mesh["tp"],
            sequence_parallel=cfg.sequence_parallel,
            loss_parallel=cfg.loss_parallel,
        )
    apply_ac(model, cfg.ac)
    if cfg.compile:
        apply_compile(model)
    dev = mesh.device_type
    param_dtype = resolve_dtype(cfg.param_dtype, device_type=dev)
    if cfg.dp > 1 or param_dtype != torch.float32:
        apply_fsdp(
            model,
            dp_mesh(mesh),
            param_dtype=param_dtype,
            reduce_dtype=resolve_dtype(cfg.reduce_dtype, device_type=dev),
            reshard_after_forward=cfg.reshard_after_forward,
            forward_prefetch=cfg.forward_prefetch,
            backward_prefetch=cfg.backward_prefetch,
        )
    return model


def apply_compile(model: Llama) -> None:
    """torch.compile each block's forward, not the module: parameter names stay unprefixed
    and FSDP's hooks, which run around forward, stay eager."""
    for block in model.layers.values():
        block.forward = torch.compile(block.forward)


@torch.no_grad()
def init_weights_parallel(model: Llama, seed: int) -> None:
    """`Llama.init_weights` for a parallelized model: each parameter gets exactly the values
    the single-process model gets. The full tensor is drawn on this rank and only the local
    shard kept (no communication), so every layout starts from the same weights."""
    stds = model.param_init_std()
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            full = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
            init_param_(full, stds[name], seed=seed, name=name)
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            init_param_(param, stds[name], seed=seed, name=name)
    model.reset_rope()


def build_llama(
    model_cfg: LlamaConfig,
    parallel_cfg: ParallelConfig,
    mesh: DeviceMesh | None,
    *,
    device: torch.device,
    seed: int = 0,
) -> Llama:
    """Build on the meta device, parallelize, materialize on `device`, initialise from `seed`.

    No rank ever holds the full model. `mesh=None` builds a plain single-process model.
    """
    with torch.device("meta"):
        model = Llama(model_cfg)
    if mesh is not None:
        parallelize_llama(model, mesh, parallel_cfg)
    model.to_empty(device=device)
    init_weights_parallel(model, seed)
    return model


def loss_context(cfg: ParallelConfig):
    """The context forward's loss and its backward run under: loss parallelism when the
    output projection leaves the logits sharded on the vocabulary."""
    if cfg.tp > 1 and cfg.loss_parallel:
        return loss_parallel()
    return contextlib.nullcontext()
