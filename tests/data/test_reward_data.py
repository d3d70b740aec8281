"""Reward-model data: sources mixed by ratio, held-out shares, and the loader's exact resume."""

from __future__ import annotations

import importlib.resources
from collections import Counter

import pytest
import torch

from llama_dist.data.preference import write_synthetic_preferences
from llama_dist.data.reward_data import (
    PreferenceLoader,
    PreferenceSource,
    RewardData,
    RewardDataConfig,
    valid_pair_batches,
)
from llama_dist.tokenizer import Tokenizer

MODEL_FILE = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(MODEL_FILE)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pairs")
    return {
        name: str(write_synthetic_preferences(root / f"{name}.jsonl", num_pairs=n, seed=i))
        for i, (name, n) in enumerate((("big", 200), ("small", 40), ("test", 30)))
    }


def config(files, **sources) -> RewardDataConfig:
    return RewardDataConfig(
        sources={
            name: PreferenceSource(paths=[files[name]], **kwargs)
            for name, kwargs in sources.items()
        },
        max_len=256,
        valid_fraction=0.1,
    )


def test_default_mix_is_the_largest_that_repeats_no_pair(files, tokenizer):
    # The paper's Helpfulness RM shape: all of one source plus an equal share of another.
    data = RewardData(config(files, small={"ratio": 0.5}, big={"ratio": 0.5}), tokenizer)
    assert [len(t) for t in data.train_ids] == [36, 180]
    assert data.shares == [36, 36]
    for epoch in (0, 1):
        items = data.epoch_items(epoch)
        assert Counter(s for s, _ in items) == {0: 36, 1: 36}
        assert len(set(items)) == len(items)  # no pair twice
        small = {i for s, i in items if s == 0}
        assert small == set(data.train_ids[0].tolist())  # the limiting source whole
    # The sampled source draws afresh each epoch; each epoch is reproducible.
    picks = [{i for s, i in data.epoch_items(e) if s == 1} for e in (0, 1)]
    assert picks[0] != picks[1]
    again = RewardData(config(files, small={"ratio": 0.5}, big={"ratio": 0.5}), tokenizer)
    assert again.epoch_items(1) == data.epoch_items(1)


def test_ratio_with_pairs_per_epoch_repeats_a_small_source(files, tokenizer):
    cfg = config(files, big={"ratio": 0.5}, small={"ratio": 0.5})
    cfg.pairs_per_epoch = 200
    data = RewardData(cfg, tokenizer)
    assert data.shares == [100, 100]
    counts = Counter(data.epoch_items(0))
    small = [c for (s, _), c in counts.items() if s == 1]
    # 100 draws from 36 pairs: two whole passes, then 28 more.
    assert sorted(Counter(small).items()) == [(2, 8), (3, 28)]


def test_held_out_pairs_per_source_and_test_only_sources(files, tokenizer):
    data = RewardData(config(files, big={}, test={"ratio": 0.0, "valid_fraction": 1.0}), tokenizer)
    assert data.shares == [180, 0]
    assert len(data.valid_ids[0]) == 20 and len(data.valid_ids[1]) == 30
    assert not set(data.train_ids[0].tolist()) & set(data.valid_ids[0].tolist())
    assert all(s == 0 for s, _ in data.epoch_items(0))


def test_loader_resumes_exactly_at_another_data_parallel_size(files, tokenizer):
    data = RewardData(config(files, big={}), tokenizer)

    def step_pairs(loader_per_rank):
        """The chosen rows of one step, over all ranks, in rank order."""
        rows = []
        for loader in loader_per_rank:
            for batch in next(loader):
                n = batch["rating_ids"].numel()
                rows += [tuple(r[r != 0].tolist()) for r in batch["tokens"][:n]]
        return rows

    one = [PreferenceLoader(data, global_batch=16, micro_batch=4, dp_rank=0, dp_size=1)]
    steps = [step_pairs(one) for _ in range(14)]  # past the 180-pair epoch
    two = [
        PreferenceLoader(data, global_batch=16, micro_batch=2, dp_rank=r, dp_size=2) for r in (0, 1)
    ]
    for loader in two:
        loader.load_state_dict({"consumed_pairs": 5 * 16})
    assert [step_pairs(two) for _ in range(9)] == steps[5:]
    assert two[0].epoch() == pytest.approx(14 * 16 / 180)


def test_valid_batches_pad_every_rank_to_the_same_count(files, tokenizer):
    data = RewardData(config(files, test={"valid_fraction": 0.3}), tokenizer)
    assert len(data.valid_ids[0]) == 9
    per_rank = [
        list(valid_pair_batches(data, 0, micro_batch=2, dp_rank=r, dp_size=2)) for r in (0, 1)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    real = torch.cat([b["pair_mask"] for batches in per_rank for b in batches])
    assert int(real.sum()) == 9 and real.numel() == 12


def test_bad_mixes_fail_with_the_fix(files, tokenizer, tmp_path):
    cases = {
        "set data.paths": RewardDataConfig(),
        "does not exist": RewardDataConfig(paths=[str(tmp_path / "none.jsonl")]),
        "must be >= 0": config(files, big={"ratio": -1.0}),
        "every source has ratio 0": config(files, big={"ratio": 0.0}),
        "give it ratio 0": config(files, big={"valid_fraction": 1.0}),
        "paths is empty": RewardDataConfig(sources={"x": PreferenceSource()}),
    }
    for message, cfg in cases.items():
        with pytest.raises(ValueError, match=message):
            cfg.validate()
    clash = config(files, big={})
    clash.sources["data"] = clash.sources.pop("big")
    clash.paths = [files["small"]]
    with pytest.raises(ValueError, match="data.paths adds a source named 'data'"):
        clash.validate()
    shorthand = RewardDataConfig(paths=[files["small"]], max_len=256)
    assert list(shorthand.validate().sources) == ["data"]
    with pytest.raises(ValueError, match="leaves none to train on"):
        RewardData(
            RewardDataConfig(
                sources={"s": PreferenceSource(paths=[files["test"]], valid_fraction=0.99)},
                max_len=256,
            ),
            tokenizer,
        )
