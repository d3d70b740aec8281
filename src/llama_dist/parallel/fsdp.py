"""FSDP2 (`fully_shard`) with explicit communication/computation overlap.

Groups, in forward order: the embedding, each transformer block, the final norm + output
projection; the root last (it owns nothing else but drives the lazy init). Each group's
parameters are all-gathered in one collective and its gradients reduce-scattered in one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, *, device_type: str) -> torch.dtype:
    """ "auto" is bf16 on accelerators and fp32 on CPU (bf16 there is emulated and slow)."""
    if name == "auto":
        return torch.float32 if device_type == "cpu" else torch.bfloat16
    return DTYPES[name]


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: str,
    forward_prefetch: int,
    backward_prefetch: int,
) -> list[FSDPModule]:
    """Shard `model` in place over `mesh` (1-D: FSDP, 2-D (replicate, shard): HSDP).

    Returns the groups in forward order. `reshard_after_forward`: "always", "never", or
    "default" = all groups but the last, whose backward follows its forward immediately.
    """
    # Inputs are not cast: the blocks get the RoPE tables as inputs, which must stay fp32
    # (`apply_rotary` computes in fp32); the hidden states arrive in param_dtype anyway, from
    # the embedding's all-gathered weights.
    mp = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
    )
    units: list[nn.Module | list[nn.Module]] = [model.tok_embeddings]
    units += list(model.layers.values())
    units.append([model.norm, model.output])

    groups: list[FSDPModule] = []
    for i, unit in enumerate(units):
        last = i == len(units) - 1
        reshard = {"always": True, "never": False, "default": not last}[reshard_after_forward]
        groups.append(fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard))
    # The root's own parameters are none; it is gathered first and never resharded early.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)

    # fully_shard on a list returns one FSDPModule per module sharing one group: keep the first.
    groups = [g[0] if isinstance(g, list) else g for g in groups]
    set_prefetch(groups, forward=forward_prefetch, backward=backward_prefetch)
    return groups


def set_prefetch(groups: list[FSDPModule], *, forward: int, backward: int) -> None:
    """Issue the all-gathers of the next `forward` (previous `backward`) groups early, so they
    overlap with the current group's compute instead of waiting for it."""
    for i, group in enumerate(groups):
        if forward:
            nxt = groups[i + 1 : i + 1 + forward]
            if nxt:
                group.set_modules_to_forward_prefetch(nxt)
        if backward:
            prev = groups[max(0, i - backward) : i][::-1]
            if prev:
                group.set_modules_to_backward_prefetch(prev)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn gradient reduction on for the last micro-batch only (no reduce-scatter or
    all-reduce on the inner micro-steps of gradient accumulation)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
