"""Reward arithmetic of the RLHF stages (llama2.md, "Rejection sampling fine-tuning", "PPO"):
the safety-gated choice between the two reward models, and the best-of-K statistics of
rejection sampling. Pure functions on tensors.

Rewards here are probabilities: the sigmoid of a reward model's score, the scale the paper's
0.15 threshold and its LOGIT(Rc) refer to.
"""

from __future__ import annotations

import math

import torch

# Rc = Rs when the prompt is safety-tagged or Rs is below this (llama2.md, "PPO").
SAFETY_THRESHOLD = 0.15


def safety_gated(
    helpful: torch.Tensor,
    safety: torch.Tensor,
    safety_tagged: torch.Tensor,
    *,
    threshold: float = SAFETY_THRESHOLD,
) -> torch.Tensor:
    """Rc per response: the Safety RM's reward where the prompt is safety-tagged or that reward
    is below `threshold`, else the Helpfulness RM's. helpful, safety: rewards in (0, 1)
    (sigmoid of the scores); safety_tagged: bool, same shape."""
    if not helpful.shape == safety.shape == safety_tagged.shape:
        raise ValueError(
            f"helpful {tuple(helpful.shape)}, safety {tuple(safety.shape)} and safety_tagged "
            f"{tuple(safety_tagged.shape)} must have one entry per response each"
        )
    use_safety = safety_tagged.to(torch.bool) | (safety < threshold)
    return torch.where(use_safety, safety, helpful)


def expected_order_statistic(scores: torch.Tensor, k: int, j: int) -> torch.Tensor:
    """E[the j-th smallest of k samples drawn without replacement from each row's K scores],
    per row (exact, not Monte Carlo): sum_i s_(i) C(i-1, j-1) C(K-i, k-j) / C(K, k) over the
    sorted scores s_(1) <= ... <= s_(K). j = k is the expected best of k."""
    num = scores.shape[-1]
    if not 1 <= j <= k <= num:
        raise ValueError(f"need 1 <= j={j} <= k={k} <= K={num}")
    ordered = scores.double().sort(dim=-1).values
    weights = torch.tensor(
        [math.comb(i - 1, j - 1) * math.comb(num - i, k - j) for i in range(1, num + 1)],
        dtype=torch.float64,
    ) / math.comb(num, k)
    return (ordered * weights).sum(-1)


def best_of_k_curve(scores: torch.Tensor) -> dict[str, list[float]]:
    """The Figure 7 curves of rejection sampling from (prompts, K) sample rewards: for each
    k = 1..K, the mean over prompts of the expected best ("max") and the expected median
    ("median") reward of k samples."""
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be (prompts, K), got {tuple(scores.shape)}")
    best, median = [], []
    for k in range(1, scores.shape[1] + 1):
        best.append(float(expected_order_statistic(scores, k, k).mean()))
        low = expected_order_statistic(scores, k, (k + 1) // 2)
        high = expected_order_statistic(scores, k, k // 2 + 1)
        median.append(float(((low + high) / 2).mean()))
    return {"max": best, "median": median}
