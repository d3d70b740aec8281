"""Ranking math and reward-model metrics against hand-computed numbers.

-log(sigmoid(x)) = log(1 + exp(-x)); e.g. x = 0.5 gives 0.474077, x = -1 gives 1.313262.
"""

from __future__ import annotations

import math

import pytest
import torch

from llama_dist.rlhf.ranking import (
    MARGIN_TABLES,
    RATINGS,
    canonical_rating,
    margin_table,
    ranking_loss,
    rating_ids,
    rating_margins,
    reward_model_loss,
    safety_loss,
)
from llama_dist.rlhf.reward_metrics import (
    accuracy_by_rating,
    accuracy_counts,
    accuracy_table,
    unsafe_recall,
    unsafe_recall_counts,
)


def softplus(x: float) -> float:  # -log(sigmoid(-x))
    return math.log1p(math.exp(x))


# Ratings and margins ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "label, bucket",
    [
        ("significantly_better", "significantly_better"),
        ("Significantly Better", "significantly_better"),
        ("significantly-better", "significantly_better"),
        ("better", "better"),
        (" BETTER ", "better"),
        ("slightly better", "slightly_better"),
        ("negligibly_better", "negligibly_better"),
        ("Negligibly better / unsure", "negligibly_better"),
        ("negligibly_better_or_unsure", "negligibly_better"),
        ("unsure", "negligibly_better"),
    ],
)
def test_canonical_rating(label, bucket):
    assert canonical_rating(label) == bucket


@pytest.mark.parametrize("label", ["much worse", "slightly", "", 3])
def test_unknown_rating_lists_the_valid_ones(label):
    with pytest.raises(ValueError, match="significantly_better.*negligibly_better"):
        canonical_rating(label)


def test_margin_tables_are_the_papers():
    assert MARGIN_TABLES["none"] == dict.fromkeys(RATINGS, 0.0)
    assert [margin_table("small")[r] for r in RATINGS] == [1.0, 2 / 3, 1 / 3, 0.0]
    assert [margin_table("large")[r] for r in RATINGS] == [3.0, 2.0, 1.0, 0.0]
    custom = margin_table(
        {"Significantly better": 5, "better": 4, "slightly-better": 3, "unsure": 1}
    )
    assert [custom[r] for r in RATINGS] == [5.0, 4.0, 3.0, 1.0]
    with pytest.raises(ValueError, match="lacks the buckets \\['negligibly_better'\\]"):
        margin_table({"significantly_better": 1, "better": 1, "slightly_better": 1})
    with pytest.raises(ValueError, match="twice"):
        margin_table({"unsure": 0, "negligibly_better": 0, "better": 1})
    with pytest.raises(ValueError, match="unknown margin table 'medium'"):
        margin_table("medium")


def test_rating_ids_and_margins():
    ids = rating_ids(["better", None, "unsure", "significantly better", "slightly_better"])
    assert ids.tolist() == [1, -1, 3, 0, 2]
    margins = rating_margins(ids, margin_table("large"))
    assert margins.tolist() == [2.0, 0.0, 0.0, 3.0, 1.0]  # unrated: no margin


# Losses -----------------------------------------------------------------------------------------
def test_ranking_loss_hand_computed():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([1.0, 1.0])
    margin = torch.tensor([0.5, 0.0])
    # pair 0: x = 2 - 1 - 0.5 = 0.5 -> log(1 + e^-0.5); pair 1: x = -1 -> log(1 + e)
    expected = torch.tensor([softplus(-0.5), softplus(1.0)])
    assert expected.tolist() == pytest.approx([0.474077, 1.313262], abs=1e-6)
    none = ranking_loss(chosen, rejected, margin, reduction="none")
    torch.testing.assert_close(none, expected)
    torch.testing.assert_close(
        ranking_loss(chosen, rejected, margin, reduction="sum"), expected.sum()
    )
    torch.testing.assert_close(ranking_loss(chosen, rejected, margin), expected.mean())
    # A float margin applies to every pair; no margin is the plain binary loss.
    assert ranking_loss(chosen, rejected, 1.0, reduction="none")[0].item() == pytest.approx(
        math.log(2.0)
    )
    assert ranking_loss(chosen, rejected).item() == pytest.approx(
        (softplus(-1.0) + softplus(1.0)) / 2
    )


def test_ranking_loss_is_stable_and_its_gradient_is_right():
    chosen = torch.tensor([-100.0, 100.0], requires_grad=True)
    rejected = torch.tensor([100.0, -100.0])
    loss = ranking_loss(chosen, rejected, reduction="none")
    # log(sigmoid(-200)) would be log(0) in float32; logsigmoid gives 200.
    assert loss.tolist() == [200.0, 0.0]
    loss.sum().backward()
    # d/dr_c of -log sigmoid(d) = -(1 - sigmoid(d)) = -sigmoid(-d)
    assert chosen.grad.tolist() == [-1.0, 0.0]
    c = torch.tensor([0.3], requires_grad=True)
    ranking_loss(c, torch.tensor([0.1]), 0.5, reduction="sum").backward()
    assert c.grad.item() == pytest.approx(-1.0 / (1.0 + math.exp(-0.3)), abs=1e-6)


def test_ranking_loss_errors():
    with pytest.raises(ValueError, match="same shape"):
        ranking_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="reduction='avg'"):
        ranking_loss(torch.zeros(2), torch.zeros(2), reduction="avg")


def test_safety_loss_hand_computed():
    scores = torch.tensor([1.0, -2.0, 0.5])
    safe = torch.tensor([1, 0, -1])  # safe, unsafe, no label
    # safe: -log sigmoid(1) = log(1 + e^-1); unsafe: -log sigmoid(2) = log(1 + e^-2)
    terms = [softplus(-1.0), softplus(-2.0), 0.0]
    assert terms[:2] == pytest.approx([0.313262, 0.126928], abs=1e-6)
    torch.testing.assert_close(safety_loss(scores, safe, reduction="none"), torch.tensor(terms))
    assert safety_loss(scores, safe, reduction="sum").item() == pytest.approx(sum(terms))
    # mean over the two labelled responses only
    assert safety_loss(scores, safe).item() == pytest.approx(sum(terms) / 2)
    # bool labels: all labelled
    assert safety_loss(scores[:2], torch.tensor([True, False])).item() == pytest.approx(
        sum(terms) / 2
    )


def test_safety_loss_without_labels_is_zero_and_differentiable():
    scores = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = safety_loss(scores, torch.tensor([-1, -1]))
    assert loss.item() == 0.0
    loss.backward()
    assert scores.grad.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="shape of the scores"):
        safety_loss(scores, torch.tensor([1]))


def test_reward_model_loss_adds_the_weighted_safety_term():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.5])
    margin = torch.tensor([1.0, 0.0])
    cs, rs = torch.tensor([1, -1]), torch.tensor([0, 1])
    ranking = [softplus(-(1.0 + 2.0 - 1.0)), softplus(0.5)]
    # labelled: chosen 0 safe (score 1), rejected 0 unsafe (score -2), rejected 1 safe (0.5)
    aux = [softplus(-1.0), softplus(-2.0), softplus(-0.5)]
    total = reward_model_loss(
        chosen, rejected, margin=margin, chosen_safe=cs, rejected_safe=rs, safety_weight=0.5
    )
    assert total.item() == pytest.approx(sum(ranking) / 2 + 0.5 * sum(aux) / 3, abs=1e-6)
    per_pair = reward_model_loss(
        chosen,
        rejected,
        margin=margin,
        chosen_safe=cs,
        rejected_safe=rs,
        safety_weight=0.5,
        reduction="none",
    )
    expected = [ranking[0] + 0.5 * (aux[0] + aux[1]), ranking[1] + 0.5 * aux[2]]
    assert per_pair.tolist() == pytest.approx(expected, abs=1e-6)
    # A helpfulness RM: the ranking loss alone, labels not needed.
    assert reward_model_loss(chosen, rejected, margin=margin).item() == pytest.approx(
        sum(ranking) / 2, abs=1e-6
    )
    with pytest.raises(ValueError, match="chosen_safe and rejected_safe"):
        reward_model_loss(chosen, rejected, safety_weight=1.0)


# Metrics ----------------------------------------------------------------------------------------
def test_accuracy_per_rating_bucket():
    chosen = torch.tensor([2.0, 1.0, 0.0, 3.0, 1.0, 5.0, 0.5])
    rejected = torch.tensor([1.0, 2.0, 0.0, 1.0, 0.0, 4.0, 0.0])
    ids = torch.tensor([0, 0, 1, 1, 2, -1, 3])
    counts = accuracy_counts(chosen, rejected, ids)
    # sig: 1 of 2; better: tie (wrong) + right = 1 of 2; slightly 1/1; negligibly 1/1;
    # avg over all 7 (the unrated pair too): 5 of 7
    assert counts.tolist() == [[1, 2], [1, 2], [1, 1], [1, 1], [5, 7]]
    acc = accuracy_by_rating(counts)
    assert acc["significantly_better"] == 0.5 and acc["avg"] == pytest.approx(5 / 7)
    none_better = accuracy_by_rating(accuracy_counts(chosen[:2], rejected[:2], ids[:2]))
    assert math.isnan(none_better["better"])
    with pytest.raises(ValueError, match="one entry per pair"):
        accuracy_counts(chosen, rejected[:3], ids)


def test_accuracy_table_layout():
    counts = torch.tensor([[4, 5], [3, 4], [0, 0], [1, 2], [8, 11]])
    table = accuracy_table({"Meta Helpful.": counts, "sum of two batches": counts + counts})
    assert table == (
        "| | Significantly Better | Better | Slightly Better | Negligibly Better / Unsure | Avg |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        "| Meta Helpful. | 80.0 (5) | 75.0 (4) | - (0) | 50.0 (2) | 72.7 (11) |\n"
        "| sum of two batches | 80.0 (10) | 75.0 (8) | - (0) | 50.0 (4) | 72.7 (22) |\n"
    )


def test_unsafe_recall_at_half():
    scores = torch.tensor([-1.0, 0.5, -0.1, 2.0, 0.0, -3.0])
    safe = torch.tensor([0, 0, 1, 0, 0, -1])
    # unsafe: -1 (flagged), 0.5, 2.0, 0.0 (sigmoid = 0.5 is not below 0.5): 1 of 4
    counts = unsafe_recall_counts(scores, safe)
    assert counts.tolist() == [1, 4]
    assert unsafe_recall(counts) == 0.25
    # threshold 0.7: logit(0.7) = 0.847, so 0.5 and 0.0 are flagged too
    assert unsafe_recall_counts(scores, safe, threshold=0.7).tolist() == [3, 4]
    assert math.isnan(unsafe_recall(unsafe_recall_counts(scores[2:3], safe[2:3])))
    with pytest.raises(ValueError, match="threshold=1.5"):
        unsafe_recall_counts(scores, safe, threshold=1.5)
