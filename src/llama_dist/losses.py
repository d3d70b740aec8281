"""Losses shared by the training loops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross entropy in fp32: the mean over labelled tokens, or per token
    (flattened) with reduction="none".

    logits (bsz, seqlen, vocab) may be a vocab-sharded DTensor: call this under
    `llama_dist.parallel.loss_context` so the softmax is computed without gathering them.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=ignore_index,
        reduction=reduction,
    )
