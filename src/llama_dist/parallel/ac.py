"""Activation recomputation: full, every k-th block, or selective per op (Korthikanti et al.).

The checkpointed forward replaces the block's `forward` in place, so parameter names stay
those of the model (no wrapper prefix) and FSDP's hooks stay outside the recomputed region.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from llama_dist.parallel.config import ACConfig

aten = torch.ops.aten

# Op groups for `ACConfig.saved_ops`. Each device dispatches to its own kernels: on CPU
# attention is the *_for_cpu flash kernel, and nn.Linear on 3-D input is aten.mm.
OP_GROUPS: dict[str, list[str]] = {
    "mm": ["aten.mm.default", "aten.addmm.default", "aten.bmm.default"],
    "sdpa": [
        "aten._scaled_dot_product_flash_attention.default",
        "aten._scaled_dot_product_efficient_attention.default",
        "aten._scaled_dot_product_cudnn_attention.default",
        "aten._scaled_dot_product_flash_attention_for_cpu.default",
        "aten._scaled_dot_product_attention_math.default",
    ],
    # Sequence parallelism's reduce-scatters: cheap to keep, a collective to redo.
    "reduce_scatter": ["_c10d_functional.reduce_scatter_tensor.default"],
}


def resolve_ops(names: list[str]) -> set:
    """Op overloads for group names or exact "namespace.op.overload" names."""
    ops = set()
    for name in names:
        for qualified in OP_GROUPS.get(name, [name]):
            namespace, op, overload = _split(qualified, name)
            try:
                ops.add(getattr(getattr(getattr(torch.ops, namespace), op), overload))
            except AttributeError:
                if name not in OP_GROUPS:
                    raise ValueError(
                        f"parallel.ac.saved_ops: unknown op {name!r}; use a group "
                        f"({sorted(OP_GROUPS)}) or a name such as 'aten.mm.default'"
                    ) from None
    return ops


def _split(qualified: str, given: str) -> tuple[str, str, str]:
    parts = qualified.split(".")
    if len(parts) != 3:
        raise ValueError(
            f"parallel.ac.saved_ops: {given!r} is neither a group ({sorted(OP_GROUPS)}) nor a "
            "'namespace.op.overload' name such as 'aten.mm.default'"
        )
    return parts[0], parts[1], parts[2]


def selective_policy(cfg: ACConfig):
    """A context_fn for `checkpoint`: save outputs of the listed ops, recompute the rest."""
    saved = resolve_ops(cfg.saved_ops)
    mm_ops = resolve_ops(["mm"])

    def context_fn():
        mm_count: dict[str, int] = defaultdict(int)

        def policy(ctx, op, *args, **kwargs):
            if cfg.save_every_other_mm and op in mm_ops:
                # Count per pass: forward and recompute must see the same decisions.
                key = "recompute" if ctx.is_recompute else "forward"
                mm_count[key] += 1
                if mm_count[key] % 2 == 0:
                    return CheckpointPolicy.PREFER_RECOMPUTE
                return CheckpointPolicy.MUST_SAVE
            if op in saved:
                return CheckpointPolicy.MUST_SAVE
            return CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

    return context_fn


def checkpoint_module(module: nn.Module, context_fn=None) -> None:
    """Recompute `module`'s forward in backward; `context_fn` makes it selective."""
    inner = module.forward
    kwargs = {"use_reentrant": False, "preserve_rng_state": False}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    module.forward = functools.partial(checkpoint, inner, **kwargs)


def apply_ac(model: nn.Module, cfg: ACConfig) -> None:
    if cfg.mode == "none":
        return
    context_fn = selective_policy(cfg) if cfg.mode == "selective" else None
    for i, block in enumerate(model.layers.values()):
        if cfg.mode == "full" and i % cfg.every:
            continue
        checkpoint_module(block, context_fn)
