"""Learning-rate schedule: linear warmup, then cosine decay to a fraction of the peak."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak rate for optimizer step `step` (0-based).

    Warmup reaches the peak at step `warmup_steps - 1`; the cosine then reaches `min_ratio`
    at the last step (`total_steps - 1`) and stays there beyond it.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float
) -> LambdaLR:
    def multiplier(step: int) -> float:
        return warmup_cosine(
            step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio
        )

    return LambdaLR(optimizer, multiplier)
