"""Losses shared by the training loops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean next-token cross entropy over the labelled tokens, in fp32.

    logits (bsz, seqlen, vocab) may be a vocab-sharded DTensor: call this under
    `llama_dist.parallel.loss_context` so the softmax is computed without gathering them.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index
    )
