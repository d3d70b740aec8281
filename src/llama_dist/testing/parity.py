"""A few optimizer steps of a Llama on any layout, for comparison with one process. The
steps go through the training loop's own `forward_backward` and clipping.

Every rank runs `train_steps`; the result (losses, gradient norms, full gradients after the
first backward, full parameters at the end) is identical on all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llama_dist.models.config import LlamaConfig
from llama_dist.parallel import (
    ParallelConfig,
    build_adamw,
    build_llama,
    build_mesh,
    dp_rank_and_size,
)
from llama_dist.train.step import clip_and_check, forward_backward


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
    labels: torch.Tensor | None = None,
) -> dict:
    """batches: (steps, global_batch, seq_len + 1) token ids; each step sees one global batch,
    split over data-parallel ranks and then into `grad_accum` micro-batches.
    `parallel_cfg=None` runs the plain single-process model; `adamw` is the AdamW
    implementation (auto, fused, foreach, for-loop). `labels` (steps, global_batch, seq_len),
    with IGNORE_INDEX on untrained tokens, replace the next-token labels."""
    if parallel_cfg is None:
        mesh, (dp_rank, dp_size) = None, (0, 1)
        parallel_cfg = ParallelConfig(dp_shard=1)
    else:
        parallel_cfg.validate(dist.get_world_size(), model_cfg, seq_len=batches.shape[-1] - 1)
        mesh = build_mesh(parallel_cfg, device="cpu")
        dp_rank, dp_size = dp_rank_and_size(mesh)
    model = build_llama(model_cfg, parallel_cfg, mesh, device=torch.device("cpu"), seed=seed)
    optimizer = build_adamw(model, lr=lr, implementation=adamw)

    losses, grad_norms, first_grads = [], [], {}
    for step, batch in enumerate(batches):
        local = batch.chunk(dp_size)[dp_rank]
        micro_batches = [{"tokens": micro} for micro in local.chunk(grad_accum)]
        if labels is not None:
            local_labels = labels[step].chunk(dp_size)[dp_rank].chunk(grad_accum)
            for micro, micro_labels in zip(micro_batches, local_labels, strict=True):
                # With explicit labels the tokens are the inputs, already aligned.
                micro["tokens"] = micro["tokens"][:, :-1]
                micro["labels"] = micro_labels
        loss = forward_backward(
            model, micro_batches, parallel=parallel_cfg, device=torch.device("cpu")
        ).loss
        if step == 0:
            first_grads = {n: full(p.grad) for n, p in model.named_parameters()}
        grad_norms.append(clip_and_check(list(model.parameters()), max_norm)[0])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    params = {n: full(p) for n, p in model.named_parameters()}
    return {"losses": losses, "grad_norms": grad_norms, "grads": first_grads, "params": params}
