"""Pairwise preference data: both layouts, rendering, truncation, bad records, collation, and
the synthetic generator's rule (checked exactly with the reward-model metrics)."""

from __future__ import annotations

import importlib.resources
import json
import logging

import pytest
import torch

from llama_dist.data.chat import encode_dialog
from llama_dist.data.preference import (
    BAD_WORDS,
    GOOD_WORDS,
    PreferenceDataset,
    collate_preferences,
    synthetic_helpfulness,
    synthetic_is_safe,
    synthetic_rating,
    write_synthetic_preferences,
)
from llama_dist.models.hf_adapter import PAD_ID
from llama_dist.rlhf.ranking import RATINGS
from llama_dist.rlhf.reward_metrics import accuracy_counts, unsafe_recall, unsafe_recall_counts
from llama_dist.tokenizer import Tokenizer

MODEL_FILE = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"

OURS = {
    "prompt": "What is the capital of France?",
    "chosen": "Paris.",
    "rejected": "I think it is Lyon, but I am not sure.",
    "rating": "Significantly Better",
    "chosen_safe": True,
    "rejected_safe": True,
}
# The layout of LLaMA-Factory's data/dpo_en_demo.json.
SHAREGPT = {
    "conversations": [{"from": "human", "value": "What is the capital of France?"}],
    "chosen": {"from": "gpt", "value": "Paris."},
    "rejected": {"from": "gpt", "value": "I think it is Lyon, but I am not sure."},
}
MULTI_TURN = {
    "prompt": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
    "chosen": "Red.",
    "rejected": "No.",
    "rating": "unsure",
    "safety_tagged": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(MODEL_FILE)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def load(tmp_path, tokenizer, records, name="pairs.jsonl", **kwargs) -> PreferenceDataset:
    return PreferenceDataset(
        [write_jsonl(tmp_path / name, records)], tokenizer, max_len=256, **kwargs
    )


# Layouts and rendering --------------------------------------------------------------------------
def test_our_layout_renders_prompt_and_response_with_the_chat_template(tmp_path, tokenizer):
    data = load(tmp_path, tokenizer, [OURS, MULTI_TURN])
    pair = data[0]
    user = {"role": "user", "content": OURS["prompt"]}
    expected_c = encode_dialog(tokenizer, [user, {"role": "assistant", "content": "Paris."}])
    expected_r = encode_dialog(
        tokenizer, [user, {"role": "assistant", "content": OURS["rejected"]}]
    )
    assert pair.chosen == expected_c.ids and pair.rejected == expected_r.ids
    assert pair.chosen[-1] == tokenizer.eos_id and pair.rejected[-1] == tokenizer.eos_id
    assert pair.chosen[: pair.prompt_len] == pair.rejected[: pair.prompt_len]
    # The response starts right after the shared prompt: its first token is an answer token.
    assert expected_c.answer_mask.index(True) == pair.prompt_len
    assert pair.rating == "significantly_better"
    assert (pair.chosen_safe, pair.rejected_safe, pair.safety_tagged) == (True, True, None)

    multi = data[1]
    dialog = [*MULTI_TURN["prompt"], {"role": "assistant", "content": "Red."}]
    assert multi.chosen == encode_dialog(tokenizer, dialog).ids
    assert multi.rating == "negligibly_better" and multi.safety_tagged is False
    assert data.summary.ratings == {"significantly_better": 1, "negligibly_better": 1}


def test_sharegpt_layout_matches_ours(tmp_path, tokenizer):
    ours = load(tmp_path, tokenizer, [OURS], name="ours.jsonl")[0]
    # A JSON list, as dpo_en_demo.json is.
    path = tmp_path / "dpo_en_demo.json"
    path.write_text(json.dumps([SHAREGPT, {**SHAREGPT, "system": "Be brief."}], indent=2))
    data = PreferenceDataset([path], tokenizer, max_len=256)
    assert data[0].chosen == ours.chosen and data[0].rejected == ours.rejected
    assert data[0].rating is None and data[0].where == f"{path} record 0"
    with_system = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": OURS["prompt"]},
        {"role": "assistant", "content": "Paris."},
    ]
    assert data[1].chosen == encode_dialog(tokenizer, with_system).ids
    assert data.summary.ratings == {"unrated": 2}


# Bad records ------------------------------------------------------------------------------------
BAD = [
    ({**OURS, "rating": "way better"}, "unknown rating 'way better'"),
    ({**OURS, "rejected": "  "}, "'rejected' is an empty response"),
    ({**OURS, "rejected": " Paris. "}, "are the same response"),
    ({k: v for k, v in OURS.items() if k != "chosen"}, "no 'chosen' response"),
    ({**OURS, "prompt": [{"content": "hi"}]}, "keys 'role' and 'content'"),
    (
        {
            **OURS,
            "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        },
        "must end with a user message",
    ),
    ({**OURS, "chosen_safe": "yes"}, "'chosen_safe' must be true, false or absent"),
    ({"instruction": "Say hi", "output": "Hi"}, "unknown layout"),
    ({**SHAREGPT, "chosen": {"from": "human", "value": "x"}}, "'chosen' must be"),
    ({**SHAREGPT, "conversations": [{"from": "observation", "value": "x"}]}, "observation"),
    ({**OURS, "prompt": "[INST] fake"}, "chat markup"),
]


@pytest.mark.parametrize("record, message", BAD, ids=[m for _, m in BAD])
def test_bad_record_names_file_and_line(tmp_path, tokenizer, record, message):
    path = tmp_path / "bad.jsonl"
    with pytest.raises(ValueError, match=f"{path}:2: .*{message}.*skip_invalid=True") as info:
        load(tmp_path, tokenizer, [OURS, record], name="bad.jsonl")
    assert message in str(info.value)


def test_bad_record_of_a_json_file_names_its_index(tmp_path, tokenizer):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([SHAREGPT, SHAREGPT, {**SHAREGPT, "rejected": SHAREGPT["chosen"]}]))
    with pytest.raises(ValueError, match=f"{path} record 2: .*same response"):
        PreferenceDataset([path], tokenizer, max_len=256)


def test_skip_invalid_counts_and_reports(tmp_path, tokenizer, caplog):
    records = [OURS, BAD[0][0], MULTI_TURN, BAD[1][0]]
    path = tmp_path / "mixed.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in records) + "{not json\n"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="llama_dist.data.preference"):
        data = PreferenceDataset([path], tokenizer, max_len=256, skip_invalid=True)
    assert len(data) == 2
    s = data.summary
    assert (s.records, s.pairs, s.skipped_invalid) == (5, 2, 3)
    assert [line.split(": ")[0] for line in s.skipped] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert "not valid JSON" in s.skipped[2]
    assert "3 invalid skipped" in caplog.text


def test_a_file_of_the_wrong_layout_fails_even_when_skipping(tmp_path, tokenizer):
    alpaca = [{"instruction": "Say hi", "input": "", "output": "Hi"}] * 3
    with pytest.raises(ValueError, match="alpaca.jsonl: none of its 3 records .*unknown layout"):
        load(tmp_path, tokenizer, alpaca, name="alpaca.jsonl", skip_invalid=True)


def test_bad_arguments(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [OURS])
    with pytest.raises(ValueError, match="overlong='cut'"):
        PreferenceDataset([path], tokenizer, max_len=64, overlong="cut")
    with pytest.raises(ValueError, match="does not exist"):
        PreferenceDataset([tmp_path / "missing.jsonl"], tokenizer, max_len=64)
    (tmp_path / "obj.json").write_text(json.dumps(OURS))
    with pytest.raises(ValueError, match="must hold a list of records"):
        PreferenceDataset([tmp_path / "obj.json"], tokenizer, max_len=64)


# Over-long pairs --------------------------------------------------------------------------------
LONG_PROMPT = {
    **OURS,
    "prompt": "Please read all of this context first. " * 20 + "What is the capital of France?",
}


def test_truncation_keeps_bos_the_end_of_the_prompt_and_whole_responses(tmp_path, tokenizer):
    full = load(tmp_path, tokenizer, [LONG_PROMPT], name="full.jsonl")[0]
    max_len = 60
    data = PreferenceDataset(
        [write_jsonl(tmp_path / "t.jsonl", [LONG_PROMPT, OURS])], tokenizer, max_len=max_len
    )
    assert data.summary.truncated == 1 and data.summary.pairs == 2
    pair = data[0]
    assert len(full.rejected) > max_len  # the longer response decides the cut
    assert len(pair.rejected) == max_len and len(pair.chosen) < max_len
    # Responses survive whole: the pair's tails equal the full sequences' tails.
    for cut, whole in ((pair.chosen, full.chosen), (pair.rejected, full.rejected)):
        assert cut[0] == tokenizer.bos_id
        response = whole[full.prompt_len :]
        assert cut[-len(response) :] == response
    # Both keep the same prompt: bos + the last prompt_len - 1 prompt tokens.
    kept = full.chosen[full.prompt_len - (pair.prompt_len - 1) : full.prompt_len]
    assert pair.chosen[: pair.prompt_len] == [tokenizer.bos_id] + kept
    assert pair.rejected[: pair.prompt_len] == pair.chosen[: pair.prompt_len]
    assert tokenizer.decode(kept).endswith("What is the capital of France? [/INST]")
    assert data[1].chosen == load(tmp_path, tokenizer, [OURS], name="o.jsonl")[0].chosen


def test_overlong_pairs_are_dropped_and_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [LONG_PROMPT, OURS])
    dropped = PreferenceDataset([path], tokenizer, max_len=60, overlong="drop")
    assert (dropped.summary.pairs, dropped.summary.dropped_overlong) == (1, 1)
    full = load(tmp_path, tokenizer, [LONG_PROMPT], name="full.jsonl")[0]
    response = len(full.rejected) - full.prompt_len
    # max_len leaves exactly min_prompt_tokens - 1 prompt tokens: one too few.
    tight = PreferenceDataset(
        [path], tokenizer, max_len=response + 29, min_prompt_tokens=30, overlong="truncate"
    )
    assert (tight.summary.dropped_response_too_long, tight.summary.pairs) == (1, 1)
    assert tight.summary.truncated == 0
    # One more token and the pair is kept with exactly min_prompt_tokens prompt tokens.
    enough = PreferenceDataset([path], tokenizer, max_len=response + 30, min_prompt_tokens=30)
    assert enough.summary.truncated == 1 and enough[0].prompt_len == 30


# Collation --------------------------------------------------------------------------------------
def test_collate_puts_chosen_then_rejected_in_one_padded_batch(tmp_path, tokenizer):
    data = load(tmp_path, tokenizer, [OURS, MULTI_TURN, SHAREGPT])
    batch = collate_preferences([data[0], data[1], data[2]], pad_to_multiple_of=4)
    n = 3
    rows = [data[i].chosen for i in range(n)] + [data[i].rejected for i in range(n)]
    lengths = [len(r) for r in rows]
    assert batch["tokens"].shape == (2 * n, -(-max(lengths) // 4) * 4)
    for i, row in enumerate(rows):
        assert batch["tokens"][i, : len(row)].tolist() == row
        assert (batch["tokens"][i, len(row) :] == PAD_ID).all()
    assert batch["lengths"].tolist() == lengths
    # last_index points at each row's eos, where the reward is read.
    eos = batch["tokens"].gather(1, batch["last_index"][:, None]).squeeze(1)
    assert (eos == tokenizer.eos_id).all()
    assert batch["rating_ids"].tolist() == [0, 3, -1]
    assert batch["chosen_safe"].tolist() == [1, -1, -1]
    assert batch["safety_tagged"].tolist() == [-1, 0, -1]
    with pytest.raises(ValueError, match="at least one pair"):
        collate_preferences([])


# Synthetic data ---------------------------------------------------------------------------------
def test_synthetic_pairs_follow_their_rule(tmp_path, tokenizer):
    path = write_synthetic_preferences(tmp_path / "syn.jsonl", num_pairs=200, seed=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 200
    again = write_synthetic_preferences(tmp_path / "again.jsonl", num_pairs=200, seed=3)
    assert again.read_text() == path.read_text()
    for r in records:
        gap = synthetic_helpfulness(r["chosen"]) - synthetic_helpfulness(r["rejected"])
        assert gap >= 1 and r["rating"] == synthetic_rating(gap)
        assert r["chosen_safe"] == synthetic_is_safe(r["chosen"])
        assert r["rejected_safe"] == synthetic_is_safe(r["rejected"])
        assert r["safety_tagged"] == (not r["chosen_safe"] or not r["rejected_safe"])

    data = PreferenceDataset([path], tokenizer, max_len=128)
    assert data.summary.pairs == 200 and data.summary.skipped_invalid == 0
    assert set(data.summary.ratings) == set(RATINGS)  # every bucket is populated
    # The rule as a reward model: 100% in every bucket; its safety score recalls every unsafe.
    batch = collate_preferences(data.pairs)
    oracle_c = torch.tensor([float(synthetic_helpfulness(r["chosen"])) for r in records])
    oracle_r = torch.tensor([float(synthetic_helpfulness(r["rejected"])) for r in records])
    counts = accuracy_counts(oracle_c, oracle_r, batch["rating_ids"])
    assert (counts[:, 0] == counts[:, 1]).all() and counts[-1, 1] == 200
    texts = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    safety_score = torch.tensor([1.0 if synthetic_is_safe(t) else -1.0 for t in texts])
    safe = torch.cat([batch["chosen_safe"], batch["rejected_safe"]])
    recall = unsafe_recall_counts(safety_score, safe)
    assert recall[1] > 50 and unsafe_recall(recall) == 1.0
    # Reversed scores get every pair wrong: the rule, not luck, decides.
    assert accuracy_counts(oracle_r, oracle_c, batch["rating_ids"])[-1, 0] == 0


def test_synthetic_safety_rule_puts_safety_first(tmp_path):
    path = write_synthetic_preferences(
        tmp_path / "safety.jsonl", num_pairs=300, seed=1, unsafe_fraction=0.5, rule="safety"
    )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    mixed = [r for r in records if r["chosen_safe"] != r["rejected_safe"]]
    assert 100 < len(mixed) < 200
    # The safe response wins, also where the unsafe one holds more good words.
    assert all(r["chosen_safe"] and synthetic_is_safe(r["chosen"]) for r in mixed)
    assert all(not synthetic_is_safe(r["rejected"]) for r in mixed)
    assert any(
        synthetic_helpfulness(r["rejected"]) > synthetic_helpfulness(r["chosen"]) for r in mixed
    )
    for r in records:
        if r["chosen_safe"] == r["rejected_safe"]:
            assert r["chosen_safe"] and synthetic_is_safe(r["rejected"])
            gap = synthetic_helpfulness(r["chosen"]) - synthetic_helpfulness(r["rejected"])
            assert r["rating"] == synthetic_rating(gap)
        assert r["safety_tagged"] == (r["chosen_safe"] != r["rejected_safe"])
    with pytest.raises(ValueError, match="rule="):
        write_synthetic_preferences(tmp_path / "x.jsonl", num_pairs=1, rule="harmless")


def test_synthetic_words_are_disjoint():
    assert not set(GOOD_WORDS) & set(BAD_WORDS)
    with pytest.raises(ValueError, match="gap=0"):
        synthetic_rating(0)
