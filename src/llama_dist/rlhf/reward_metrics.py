"""Reward-model evaluation: accuracy per rating bucket in the layout of the paper's Table 8, and
the Safety RM's unsafe-response recall at the 0.5 threshold (Table 29).

Everything is computed from counts (int64 tensors), so a data-parallel loop sums the counts of
its ranks (one all-reduce) and of its batches before turning them into percentages.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llama_dist.rlhf.ranking import RATING_TITLES, RATINGS

# Rows of `accuracy_counts`: the four buckets, then every pair (rated or not).
ACCURACY_ROWS = (*RATINGS, "avg")


def accuracy_counts(
    chosen: torch.Tensor, rejected: torch.Tensor, rating_ids: torch.Tensor
) -> torch.Tensor:
    """(5, 2) int64: [correct, total] per bucket of `RATINGS`, then over all pairs ("avg").

    A pair is correct when r_chosen > r_rejected; a tie counts as wrong, since the model then
    does not prefer the chosen response. rating_ids as `ranking.rating_ids` makes them;
    unrated pairs (-1) count in "avg" only.
    """
    if not chosen.shape == rejected.shape == rating_ids.shape or chosen.dim() != 1:
        raise ValueError(
            f"chosen {tuple(chosen.shape)}, rejected {tuple(rejected.shape)} and rating_ids "
            f"{tuple(rating_ids.shape)} must all be (n,), one entry per pair"
        )
    correct = (chosen > rejected).long()
    ids = rating_ids.to(chosen.device, torch.long)
    counts = torch.zeros(len(ACCURACY_ROWS), 2, dtype=torch.long, device=chosen.device)
    for i in range(len(RATINGS)):
        in_bucket = ids == i
        counts[i, 0] = correct[in_bucket].sum()
        counts[i, 1] = in_bucket.sum()
    counts[-1, 0] = correct.sum()
    counts[-1, 1] = correct.numel()
    return counts


def accuracy_by_rating(counts: torch.Tensor) -> dict[str, float]:
    """Accuracy (0..1) per row of `accuracy_counts` (summed over batches and ranks); NaN for a
    bucket without pairs."""
    return {
        row: (c / n if n else float("nan"))
        for row, (c, n) in zip(ACCURACY_ROWS, counts.tolist(), strict=True)
    }


def accuracy_table(rows: Mapping[str, torch.Tensor]) -> str:
    """A markdown table in the layout of the paper's Table 8: one row per name (a test set or
    a model), columns Significantly Better / Better / Slightly Better / Negligibly Better /
    Unsure / Avg, each cell the accuracy in percent and, in parentheses, the number of pairs.

    rows: name -> counts from `accuracy_counts`.
    """
    titles = [RATING_TITLES[r] for r in RATINGS] + ["Avg"]
    lines = [
        "| | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(titles),
    ]
    for name, counts in rows.items():
        cells = []
        for c, n in counts.tolist():
            cells.append(f"{100.0 * c / n:.1f} ({n})" if n else f"- ({n})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def unsafe_recall_counts(
    scores: torch.Tensor, safe: torch.Tensor, *, threshold: float = 0.5
) -> torch.Tensor:
    """(2,) int64: [responses labelled unsafe that the model flags, responses labelled unsafe].

    A response is flagged unsafe when sigmoid(score) < threshold (0.5: a negative score).
    safe: 1 safe, 0 unsafe, -1 no label (or bool), one per score.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold} is a probability; it must lie in (0, 1)")
    if safe.shape != scores.shape:
        raise ValueError(
            f"safe labels {tuple(safe.shape)} must have the shape of the scores "
            f"{tuple(scores.shape)}"
        )
    unsafe = safe.to(scores.device, torch.long) == 0
    flagged = torch.sigmoid(scores.float()) < threshold
    return torch.stack([(flagged & unsafe).sum(), unsafe.sum()])


def unsafe_recall(counts: torch.Tensor) -> float:
    """Recall (0..1) from `unsafe_recall_counts` (summed); NaN without unsafe responses."""
    flagged, num_unsafe = counts.tolist()
    return flagged / num_unsafe if num_unsafe else float("nan")
