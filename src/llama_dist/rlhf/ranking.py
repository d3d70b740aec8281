"""Reward-model ranking math (../shared/docs/llama2.md, "Reward models"; Touvron et al. 2023,
section 3.2.2 and appendix A.3.4): the annotators' rating labels, the margin tables, the binary
ranking loss with a margin, and the Safety RM's auxiliary safe/unsafe term.

Pure functions on tensors; a training loop only calls them. Scores are the reward model's
outputs before any sigmoid.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

# The four buckets of the annotators' preference strength, strongest first (the paper's order).
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
# Column titles of the paper's Table 8.
RATING_TITLES = {
    "significantly_better": "Significantly Better",
    "better": "Better",
    "slightly_better": "Slightly Better",
    "negligibly_better": "Negligibly Better / Unsure",
}
# Accepted spellings, after lower-casing and turning runs of spaces, hyphens and slashes into
# one underscore. The fourth bucket is "negligibly better / unsure" in the paper.
_ALIASES = {
    "significantly_better": "significantly_better",
    "much_better": "significantly_better",
    "better": "better",
    "slightly_better": "slightly_better",
    "negligibly_better": "negligibly_better",
    "negligibly_better_unsure": "negligibly_better",
    "negligibly_better_or_unsure": "negligibly_better",
    "unsure": "negligibly_better",
}
# Margins m(r) by rating: Table 27 of the paper. "none" is the plain binary ranking loss.
MARGIN_TABLES: dict[str, dict[str, float]] = {
    "none": dict.fromkeys(RATINGS, 0.0),
    "small": {
        "significantly_better": 1.0,
        "better": 2.0 / 3.0,
        "slightly_better": 1.0 / 3.0,
        "negligibly_better": 0.0,
    },
    "large": {
        "significantly_better": 3.0,
        "better": 2.0,
        "slightly_better": 1.0,
        "negligibly_better": 0.0,
    },
}
REDUCTIONS = ("mean", "sum", "none")
# rating id of a pair without a rating (see `rating_ids`).
UNRATED = -1


def canonical_rating(label: str) -> str:
    """The bucket of a rating label: one of `RATINGS`.

    Accepts the paper's wording in common spellings ("Significantly better",
    "significantly_better", "slightly-better", "negligibly better/unsure", "unsure", ...);
    ValueError listing the accepted labels otherwise.
    """
    if not isinstance(label, str):
        raise ValueError(f"rating {label!r} must be a string, one of {list(RATINGS)}")
    key = re.sub(r"[\s\-/]+", "_", label.strip().lower())
    if key not in _ALIASES:
        raise ValueError(
            f"unknown rating {label!r}; use one of {list(RATINGS)} (also accepted: "
            f"{sorted(set(_ALIASES) - set(RATINGS))}, with spaces or hyphens for underscores)"
        )
    return _ALIASES[key]


def rating_ids(labels: Sequence[str | None], *, device: torch.device | str | None = None):
    """The index of each label's bucket in `RATINGS` (long tensor); `UNRATED` (-1) for None."""
    ids = [UNRATED if label is None else RATINGS.index(canonical_rating(label)) for label in labels]
    return torch.tensor(ids, dtype=torch.long, device=device)


def margin_table(spec: str | Mapping[str, float]) -> dict[str, float]:
    """The margin of each bucket: a table's name ("none", "small", "large") or a custom dict
    from rating labels (any accepted spelling) to margins, covering all four buckets."""
    if isinstance(spec, str):
        if spec not in MARGIN_TABLES:
            raise ValueError(
                f"unknown margin table {spec!r}; use one of {sorted(MARGIN_TABLES)} or a dict "
                f"from each of {list(RATINGS)} to its margin"
            )
        return dict(MARGIN_TABLES[spec])
    table: dict[str, float] = {}
    for label, margin in spec.items():
        bucket = canonical_rating(label)
        if bucket in table:
            raise ValueError(f"margin table names the bucket {bucket!r} twice (as {label!r})")
        table[bucket] = float(margin)
    missing = [r for r in RATINGS if r not in table]
    if missing:
        raise ValueError(f"margin table lacks the buckets {missing}; give a margin for each")
    return table


def rating_margins(ids: torch.Tensor, table: Mapping[str, float]) -> torch.Tensor:
    """Margins (float, same shape as `ids`) of rating ids from `rating_ids`; unrated pairs
    (-1) get margin 0, as the plain binary ranking loss has."""
    values = torch.tensor([table[r] for r in RATINGS] + [0.0], device=ids.device)
    # UNRATED = -1 indexes the trailing 0.
    return values[ids]


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")


def ranking_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | float = 0.0,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """-log(sigmoid(r_chosen - r_rejected - m)) per pair, reduced by `reduction`.

    chosen, rejected: (n,) rewards; margin: a float or (n,) margins (`rating_margins`).
    Computed as -logsigmoid, which is finite for any difference (log(sigmoid(x)) underflows to
    -inf once sigmoid(x) rounds to 0).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} rewards must "
            "have the same shape, one of each per pair"
        )
    return _reduce(-F.logsigmoid(chosen - rejected - margin), reduction)


def safety_loss(
    scores: torch.Tensor, safe: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """The Safety RM's auxiliary term on responses labelled safe or unsafe.

    -log(sigmoid(r)) on a response labelled safe and -log(sigmoid(-r)) on one labelled unsafe:
    a binary cross-entropy on the score with sigmoid(r) = 0.5 (r = 0) as the decision
    threshold, which is the threshold at which the paper (appendix A.3.4, Table 29) measures
    the unsafe-response recall this term improves. The paper describes the term but not its
    formula; this is the plain binary form, documented as ours.

    scores: rewards of any shape; safe: same shape, 1 (safe), 0 (unsafe) or -1 (no label), or
    bool (every response labelled). Unlabelled responses add nothing; "mean" averages over the
    labelled ones (0 when there are none) and "none" returns 0 for the unlabelled.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")
    if safe.shape != scores.shape:
        raise ValueError(
            f"safe labels {tuple(safe.shape)} must have the shape of the scores "
            f"{tuple(scores.shape)}, one label per response"
        )
    safe = safe.to(scores.device, torch.long)
    labelled = safe >= 0
    sign = torch.where(safe == 1, 1.0, -1.0).to(scores.dtype)
    per_response = torch.where(labelled, -F.logsigmoid(sign * scores), 0.0)
    if reduction == "mean":
        # clamp: with no labelled response the term is 0 and still part of the graph.
        return per_response.sum() / labelled.sum().clamp(min=1)
    return _reduce(per_response, reduction)


def reward_model_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: torch.Tensor | float = 0.0,
    chosen_safe: torch.Tensor | None = None,
    rejected_safe: torch.Tensor | None = None,
    safety_weight: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """`ranking_loss` plus, for a Safety RM, `safety_weight` times `safety_loss` on both
    responses of each pair.

    With "mean" the two terms are averaged separately (over pairs and over labelled responses);
    with "sum" both are sums; with "none" the result is per pair, the safety term of a pair
    being the sum over its two responses. For exact equality across data-parallel layouts,
    reduce with "sum" and divide by global counts.
    """
    loss = ranking_loss(chosen, rejected, margin, reduction=reduction)
    if safety_weight == 0.0:
        return loss
    if chosen_safe is None or rejected_safe is None:
        raise ValueError(
            "safety_weight > 0 needs chosen_safe and rejected_safe labels (1 safe, 0 unsafe, "
            "-1 unknown); give them, or set safety_weight=0 for a helpfulness RM"
        )
    if reduction == "none":
        aux = safety_loss(chosen, chosen_safe, reduction="none") + safety_loss(
            rejected, rejected_safe, reduction="none"
        )
    else:
        aux = safety_loss(
            torch.cat([chosen, rejected]),
            torch.cat([chosen_safe, rejected_safe]),
            reduction=reduction,
        )
    return loss + safety_weight * aux
