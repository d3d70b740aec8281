"""The safety-gated reward rule and the best-of-K statistics against hand-computed values."""

from __future__ import annotations

import itertools
import json
import statistics

import pytest
import torch

from llama_dist.data.prompts import Prompt, parse_prompt, prompt_key, read_prompts
from llama_dist.rlhf.rewards import best_of_k_curve, expected_order_statistic, safety_gated
from llama_dist.rlhf.scoring import WordShareScorer


def test_safety_gated_rule_by_hand():
    helpful = torch.tensor([0.9, 0.9, 0.9, 0.2])
    safety = torch.tensor([0.5, 0.1, 0.5, 0.149])
    tagged = torch.tensor([False, False, True, False])
    # untagged + safe enough -> Rh; Rs < 0.15 -> Rs; tagged -> Rs; 0.149 < 0.15 -> Rs
    expected = torch.tensor([0.9, 0.1, 0.5, 0.149])
    torch.testing.assert_close(safety_gated(helpful, safety, tagged), expected)
    at_threshold = safety_gated(helpful[:1], torch.tensor([0.15]), tagged[:1])
    assert at_threshold.item() == pytest.approx(0.9)  # "below" is strict
    with pytest.raises(ValueError, match="one entry per response"):
        safety_gated(helpful, safety[:2], tagged)


def test_expected_order_statistics_equal_enumeration_over_subsets():
    scores = torch.tensor([[0.3, 0.9, 0.1, 0.5, 0.7], [1.0, 1.0, 0.0, 2.0, -1.0]])
    for k in range(1, 6):
        for row in range(2):
            subsets = list(itertools.combinations(scores[row].tolist(), k))
            for j in range(1, k + 1):
                brute = sum(sorted(s)[j - 1] for s in subsets) / len(subsets)
                got = expected_order_statistic(scores, k, j)[row].item()
                assert got == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError, match="k=6"):
        expected_order_statistic(scores, 6, 1)


def test_best_of_k_curve_shape():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(200, 12, generator=gen)
    curve = best_of_k_curve(scores)
    best, median = curve["max"], curve["median"]
    assert best[0] == pytest.approx(scores.mean().item())  # k = 1: one sample's mean
    assert best[-1] == pytest.approx(scores.max(1).values.mean().item())
    assert all(b2 >= b1 for b1, b2 in zip(best[:-1], best[1:], strict=True))  # max grows with k
    assert best[-1] - best[0] > 0.3
    # The median of k draws stays near the distribution's median (0.5 for uniform rewards).
    assert max(median) - min(median) < 0.05
    row = scores[0].tolist()
    full_median = sum(statistics.median(s) for s in itertools.combinations(row, 4)) / 495
    assert best_of_k_curve(scores[:1])["median"][3] == pytest.approx(full_median, abs=1e-9)


def test_prompt_layouts_and_keys(tmp_path):
    records = [
        {"prompt": "Hi?", "safety_tagged": True},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "x"}]},
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
        {
            "conversations": [{"from": "human", "value": "Why?"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        },
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = read_prompts([path])
    # The messages record renders the same dialog as the first: one prompt, kept once.
    assert [p.dialog[-1]["content"] for p in prompts] == ["Hi?", "Name a colour.", "Why?"]
    assert prompts[0].safety_tagged and not prompts[1].safety_tagged
    assert prompts[0].key == prompt_key([{"role": "user", "content": "Hi?"}])
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: .*must end with a user message"):
        read_prompts([path])
    with pytest.raises(ValueError, match="'safety_tagged' must be"):
        parse_prompt({"prompt": "x", "safety_tagged": "yes"})


def test_word_share_scorer():
    prompt = Prompt("k", [{"role": "user", "content": "q"}], False, "here")
    scorer = WordShareScorer(["cat", "dog"])
    got = scorer.score([prompt] * 3, ["cat dog sat", "", "the mat"])
    torch.testing.assert_close(got, torch.tensor([2 / 3, 0.0, 0.0]))
