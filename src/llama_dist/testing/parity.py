"""A few optimizer steps of a Llama on any layout, for comparison with one process.

Every rank runs `train_steps`; the result (losses, gradient norms, full gradients after the
first backward, full parameters at the end) is identical on all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llama_dist.losses import cross_entropy_loss
from llama_dist.models.config import LlamaConfig
from llama_dist.parallel import (
    ParallelConfig,
    build_adamw,
    build_llama,
    build_mesh,
    clip_grad_norm_,
    dp_rank_and_size,
    loss_context,
    set_gradient_sync,
)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().clone()


def train_steps(
    model_cfg: LlamaConfig,
    parallel_cfg: ParallelConfig | None,
    batches: torch.Tensor,
    *,
    grad_accum: int = 1,
    lr: float = 1e-3,
    max_norm: float = 1.0,
    seed: int = 0,
    adamw: str = "auto",
) -> dict:
    """batches: (steps, global_batch, seq_len + 1) token ids; each step sees one global batch,
    split over data-parallel ranks and then into `grad_accum` micro-batches.
    `parallel_cfg=None` runs the plain single-process model; `adamw` is the AdamW
    implementation (auto, fused, foreach, for-loop)."""
    if parallel_cfg is None:
        mesh, (dp_rank, dp_size) = None, (0, 1)
        parallel_cfg = ParallelConfig(dp_shard=1)
    else:
        parallel_cfg.validate(dist.get_world_size(), model_cfg, seq_len=batches.shape[-1] - 1)
        mesh = build_mesh(parallel_cfg)
        dp_rank, dp_size = dp_rank_and_size(mesh)
    model = build_llama(model_cfg, parallel_cfg, mesh, device=torch.device("cpu"), seed=seed)
    optimizer = build_adamw(model, lr=lr, implementation=adamw)

    losses, grad_norms, first_grads = [], [], {}
    for step, batch in enumerate(batches):
        local = batch.chunk(dp_size)[dp_rank]
        step_loss = torch.zeros(())
        for i, micro in enumerate(local.chunk(grad_accum)):
            set_gradient_sync(model, i == grad_accum - 1)
            with loss_context(parallel_cfg):
                logits = model(micro[:, :-1])
                loss = cross_entropy_loss(logits, micro[:, 1:]) / grad_accum
                loss.backward()
            step_loss += full(loss)
        if step == 0:
            first_grads = {n: full(p.grad) for n, p in model.named_parameters()}
        grad_norms.append(clip_grad_norm_(list(model.parameters()), max_norm).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.is_initialized() and mesh is not None:
            # Tensor-parallel ranks hold the same loss, so the world mean is the dp mean.
            dist.all_reduce(step_loss)
            step_loss /= dist.get_world_size()
        losses.append(step_loss.item())
    params = {n: full(p) for n, p in model.named_parameters()}
    return {"losses": losses, "grad_norms": grad_norms, "grads": first_grads, "params": params}
