"""Ghost Attention data, its adherence table and the attention paid to the instruction."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from chat_helpers import BASE, make_tokenizer, write_jsonl  # noqa: E402

from llama_dist.data.chat import encode_dialog, render_dialog  # noqa: E402
from llama_dist.data.gatt import (  # noqa: E402
    GattDialog,
    RuleResponder,
    augment,
    build_sample,
    model_responder,
    read_gatt_dialogs,
    sample_answers,
    synthetic_words,
    with_instructions,
    write_baseline_data,
    write_gatt_data,
    write_synthetic_dialogs,
)
from llama_dist.data.sft import SFTData, SFTDataConfig  # noqa: E402
from llama_dist.losses import IGNORE_INDEX  # noqa: E402
from llama_dist.models.llama import Llama, apply_rotary  # noqa: E402
from llama_dist.rlhf.gatt_eval import (  # noqa: E402
    attention_weights,
    evaluate_adherence,
    plot_system_attention,
    system_attention,
    text_token_mask,
    write_adherence_report,
)
from llama_dist.rlhf.instructions import (  # noqa: E402
    CapitalLetters,
    Instruction,
    MaxWords,
    StartWith,
    Trait,
)
from llama_dist.tokenizer import Tokenizer  # noqa: E402

TURNS = 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    return Tokenizer(make_tokenizer(root, tuple(synthetic_words())))


@pytest.fixture
def dialogs(tmp_path) -> list[GattDialog]:
    return read_gatt_dialogs(write_synthetic_dialogs(tmp_path / "d.jsonl", 6, TURNS, seed=3))


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    model = Llama(BASE)
    model.init_weights(seed=1)
    # Larger weights than the init's, so that the attention is far from uniform.
    with torch.no_grad():
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(20)
            layer.attention.wk.weight.mul_(20)
    return model.eval()


def test_synthetic_dialogs_are_reproducible(tmp_path):
    a = write_synthetic_dialogs(tmp_path / "a.jsonl", 5, 3, seed=1).read_text()
    b = write_synthetic_dialogs(tmp_path / "b.jsonl", 5, 3, seed=1).read_text()
    assert a == b != write_synthetic_dialogs(tmp_path / "c.jsonl", 5, 3, seed=2).read_text()
    dialogs = read_gatt_dialogs(tmp_path / "a.jsonl")
    assert all(len(d.users) == 3 and d.instruction.checks for d in dialogs)
    assert all(u.startswith("repeat: ") for d in dialogs for u in d.users)


def test_augment_puts_the_instruction_in_every_user_turn(dialogs):
    users = ["repeat: the cat", "repeat: a dog", "repeat: sun"]
    augmented = augment(users, 'End with "ciao".')
    assert augmented == [f'End with "ciao".\n\n{u}' for u in users]

    # Sampling shows the responder the augmented dialog (the instruction in full), turn by
    # turn, every dialog of a turn in one call.
    seen = []

    def respond(views):
        seen.append(views)
        return RuleResponder(follow="turn")(views)

    answers = sample_answers(dialogs, respond)
    assert len(seen) == TURNS and all(len(views) == len(dialogs) for views in seen)
    for t, views in enumerate(seen):
        for d, view in zip(dialogs, views, strict=True):
            users = [m["content"] for m in view if m["role"] == "user"]
            assert len(users) == t + 1 and all(m["role"] != "system" for m in view)
            assert all(u.startswith(d.instruction.full_text + "\n\n") for u in users)
    # The turn-following responder sees the instruction in every turn: every answer follows.
    assert all(
        d.instruction.check(a) for d, said in zip(dialogs, answers, strict=True) for a in said
    )


def _assert_gatt_sample(record, *, instruction_text):
    messages = record["messages"]
    assert messages[0] == {"role": "system", "content": instruction_text}
    segments = render_dialog(messages)
    # The instruction appears once, in the first user turn (the system message folded in).
    assert instruction_text in segments[0].prompt
    rendered = "".join(s.text for s in segments)
    assert rendered.count(instruction_text) == 1
    for s in segments[1:]:
        assert instruction_text not in s.text
    for m in messages[1:]:
        assert instruction_text not in m["content"]


def test_gatt_samples_through_the_sft_path(tmp_path, tokenizer, dialogs):
    summary = write_gatt_data(tmp_path / "gatt.jsonl", dialogs, RuleResponder(follow="turn"))
    records = [json.loads(line) for line in (tmp_path / "gatt.jsonl").read_text().splitlines()]
    # One sample per turn position: turn t with the history before it.
    assert summary["records"] == len(records) == len(dialogs) * TURNS
    assert summary["checked_answers_followed"] == summary["checked_answers"] == 6 * TURNS
    assert [r["gatt"]["turn"] for r in records[:TURNS]] == list(range(1, TURNS + 1))
    for record, d in zip(records, [d for d in dialogs for _ in range(TURNS)], strict=True):
        assert record["train_on"] == "last"
        assert sum(m["role"] == "user" for m in record["messages"]) == record["gatt"]["turn"]
        _assert_gatt_sample(record, instruction_text=d.instruction.text)
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert all(d.instruction.check(a) for a in answers)

    # Mixed with an ordinary dialog in one job of train_on=all: the GAtt records train on
    # their last turn, the ordinary one on all of its turns.
    ordinary = {
        "messages": [
            {"role": "user", "content": "repeat: the cat"},
            {"role": "assistant", "content": "the cat"},
            {"role": "user", "content": "repeat: a dog"},
            {"role": "assistant", "content": "a dog"},
        ]
    }
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*records, ordinary])
    data = SFTData(
        SFTDataConfig(paths=[str(mixed)], seq_len=512, pack=False, cache=False),
        tokenizer,
        write_cache=False,
    )
    assert len(data.samples.ids) == len(records) + 1
    for i, record in enumerate([*records, ordinary]):
        tokens = encode_dialog(tokenizer, record["messages"])
        batch = data.batch([[i]])
        n = len(tokens.ids) - 1
        labels = batch["labels"][0, :n]
        expected = tokens.last_answer_mask() if "train_on" in record else tokens.answer_mask
        want = torch.tensor(expected[1:])
        assert torch.equal(labels != IGNORE_INDEX, want)
        assert torch.equal(labels[want], torch.tensor(tokens.ids[1:])[want])
        assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
        if "train_on" in record:
            # Every token before the last assistant turn is ignored, its own answer included.
            last = max(tokens.turns)
            first_last = tokens.turns.index(last)
            assert (labels[:first_last] == IGNORE_INDEX).all()
            assert (labels[first_last:] != IGNORE_INDEX).sum() == sum(tokens.last_answer_mask())
    assert sum(data.samples.labels_mask[-1]) == sum(
        encode_dialog(tokenizer, ordinary["messages"]).answer_mask
    )


def test_build_sample_placements():
    users, answers = ["repeat: a", "repeat: b"], ["a ciao", "b ciao"]
    prefix = build_sample(users, answers, "End with x.", placement="prefix")
    assert prefix["messages"][0] == {"role": "user", "content": "End with x.\n\nrepeat: a"}
    assert prefix["messages"][2] == {"role": "user", "content": "repeat: b"}
    system = build_sample(users, answers, "End with x.")
    assert render_dialog(system["messages"])[0].prompt.startswith(
        "[INST] <<SYS>>\nEnd with x.\n<</SYS>>\n\nrepeat: a"
    )
    assert system["train_on"] == prefix["train_on"] == "last"
    with pytest.raises(ValueError, match="one answer per user message"):
        build_sample(users, answers[:1], "x")


def test_baseline_data_follows_the_instruction_at_turn_one_only(tmp_path, dialogs):
    summary = write_baseline_data(tmp_path / "base.jsonl", dialogs, RuleResponder(follow="turn"))
    records = [json.loads(line) for line in (tmp_path / "base.jsonl").read_text().splitlines()]
    assert summary["records"] == len(records) == len(dialogs)
    for record, d in zip(records, dialogs, strict=True):
        assert record["train_on"] == "all"
        _assert_gatt_sample(record, instruction_text=d.instruction.text)
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert [d.instruction.check(a) for a in answers] == [True] + [False] * (TURNS - 1)


def test_adherence_table(tmp_path, dialogs):
    mixed = [
        *dialogs,
        GattDialog(
            ("repeat: the cat", "repeat: sun sky"),
            Instruction((Trait("persona", "a pirate"), CapitalLetters()), (True, False)),
        ),
        GattDialog(("repeat: the big red dog",), Instruction((MaxWords(5), StartWith("so")))),
    ]
    forgetting = evaluate_adherence(RuleResponder(follow="turn"), mixed)
    assert forgetting.num_turns == TURNS
    rows = forgetting.rows()
    assert rows["all"] == [1.0, 0.0, 0.0, 0.0]
    assert rows["capital_letters"] == [1.0, 0.0, None, None]
    assert rows["max_words+start_with"] == [1.0, None, None, None]
    for kind in {d.instruction.kind for d in dialogs}:
        assert rows[kind] == [1.0, 0.0, 0.0, 0.0]
    assert forgetting.fraction("all", 1) == 1.0 and forgetting.fraction("all", 2) == 0.0
    # Turn 1 answered the whole dialog set; later turns only the dialogs that long.
    assert forgetting.counted["all"] == [len(mixed), len(mixed) - 1, len(dialogs), len(dialogs)]

    remembering = evaluate_adherence(RuleResponder(follow="dialog"), mixed)
    assert remembering.rows()["all"] == [1.0] * TURNS
    assert all(f in (1.0, None) for row in remembering.rows().values() for f in row)
    never = evaluate_adherence(RuleResponder(follow="never"), mixed, num_turns=2)
    assert never.rows()["all"] == [0.0, 0.0]
    longer = evaluate_adherence(RuleResponder(follow="dialog"), mixed, num_turns=TURNS + 1)
    assert longer.rows()["all"] == [1.0] * TURNS + [None]
    assert evaluate_adherence(RuleResponder(), [], num_turns=2).rows() == {"all": [None, None]}

    text = forgetting.markdown()
    assert text.splitlines()[0] == "| instruction | turn 1 | turn 2 | turn 3 | turn 4 |"
    assert "| all | 100% | 0% | 0% | 0% |" in text
    assert "| capital_letters | 100% | 0% | - | - |" in text
    assert (
        "Instruction adherence" in write_adherence_report(forgetting, tmp_path / "a.md").read_text()
    )
    with pytest.raises(ValueError, match="no instruction with a check"):
        evaluate_adherence(
            RuleResponder(), [GattDialog(("hi",), Instruction((Trait("hobby", "chess"),)))]
        )


def test_attention_weights_match_a_manual_softmax(model):
    tokens = torch.randint(3, BASE.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    weights = attention_weights(model, tokens[0].tolist())
    assert weights.shape == (BASE.n_layers, BASE.n_heads, 24, 24)
    assert torch.allclose(weights.sum(-1), torch.ones(BASE.n_layers, BASE.n_heads, 24), atol=1e-5)
    assert weights.min() >= 0 and weights.max() <= 1
    assert torch.all(weights.triu(1) == 0)  # causal
    assert weights.max() > 0.5  # not uniform: a test that can tell a wrong softmax

    # Layer 0 by hand: softmax(q k^T / sqrt(d)) with causal mask and grouped kv heads.
    attention = model.layers["0"].attention
    captured = {}
    handle = attention.register_forward_hook(lambda m, args, out: captured.update(out=out))
    with torch.no_grad():
        model(tokens)
        x = model.layers["0"].attention_norm(model.tok_embeddings(tokens))
        cos, sin = model.rope_cos[:24], model.rope_sin[:24]
        hd = BASE.head_dim
        q = apply_rotary(attention.wq(x).view(1, 24, BASE.n_heads, hd), cos, sin)
        k = apply_rotary(attention.wk(x).view(1, 24, BASE.num_kv_heads, hd), cos, sin)
        v = attention.wv(x).view(1, 24, BASE.num_kv_heads, hd)
        rep = BASE.n_heads // BASE.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(hd)
        causal = torch.ones(24, 24, dtype=torch.bool).tril()
        manual = scores.masked_fill(~causal, float("-inf")).softmax(-1)[0]
        # And the weights are the ones the model's SDPA used: they give its attention output.
        out = attention.wo(
            (weights[0][None] @ v.transpose(1, 2)).transpose(1, 2).reshape(1, 24, -1)
        )
    handle.remove()
    assert torch.allclose(weights[0], manual, atol=1e-6)
    assert torch.allclose(out, captured["out"], atol=1e-5)


def test_system_attention_and_heat_map(tmp_path, model, tokenizer):
    instruction = 'End with "ciao".'
    dialog = [
        {"role": "system", "content": instruction},
        {"role": "user", "content": "repeat: the cat"},
        {"role": "assistant", "content": "the cat ciao"},
        {"role": "user", "content": "repeat: a big dog"},
        {"role": "assistant", "content": "a big dog ciao"},
    ]
    ids = encode_dialog(tokenizer, dialog).ids
    keys = text_token_mask(tokenizer, ids, instruction)
    covered = tokenizer.decode([t for t, k in zip(ids, keys, strict=True) if k])
    assert instruction in covered and len(covered) <= len(instruction) + 2
    assert keys.index(True) > 0 and sum(keys) < len(ids) // 2

    result = system_attention(model, tokenizer, dialog)
    answer_len = sum(encode_dialog(tokenizer, dialog).last_answer_mask())
    assert result.mass.shape == (BASE.n_layers, answer_len) == (BASE.n_layers, len(result.pieces))
    assert np.all(result.mass >= 0) and np.all(result.mass <= 1 + 1e-6)
    assert result.num_instruction_tokens == sum(keys)
    # Equal to the head mean of the full weights, summed over the instruction's keys.
    weights = attention_weights(model, ids)
    queries = torch.tensor(encode_dialog(tokenizer, dialog).last_answer_mask())
    expected = weights[:, :, queries][..., torch.tensor(keys)].sum(-1).mean(1)
    assert np.allclose(result.mass, expected.numpy(), atol=1e-6)

    png = plot_system_attention(result, tmp_path / "attention.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_responder_samples_through_generate(tmp_path, tokenizer, dialogs):
    # Room for two augmented turns, whatever the random answers decode to.
    model = Llama(dataclasses.replace(BASE, max_seq_len=512))
    model.init_weights(seed=0)
    respond = model_responder(model.eval(), tokenizer, max_new_tokens=4, temperature=1.0, seed=5)
    short = [GattDialog(d.users[:2], d.instruction) for d in dialogs[:3]]
    first = sample_answers(short, respond)
    again = sample_answers(
        short, model_responder(model, tokenizer, max_new_tokens=4, temperature=1.0, seed=5)
    )
    assert first == again and all(isinstance(a, str) for said in first for a in said)
    assert respond([]) == []


def test_a_records_train_on_must_be_known(tmp_path, tokenizer):
    record = build_sample(["repeat: a"], ["a"], "x")
    path = write_jsonl(tmp_path / "bad.jsonl", [record | {"train_on": "first"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: the record's 'train_on'='first'"):
        SFTData(
            SFTDataConfig(paths=[str(path)], seq_len=64, cache=False), tokenizer, write_cache=False
        )


def test_dialogs_from_sft_records_get_instructions(tmp_path):
    sft = {
        "messages": [
            {"role": "user", "content": "repeat: the cat"},
            {"role": "assistant", "content": "the cat"},
            {"role": "user", "content": "repeat: a dog"},
            {"role": "assistant", "content": "a dog"},
        ]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [sft, {"users": ["repeat: sun"]}])
    dialogs = read_gatt_dialogs(path)
    assert [d.users for d in dialogs] == [("repeat: the cat", "repeat: a dog"), ("repeat: sun",)]
    assert all(d.instruction is None for d in dialogs)
    filled = with_instructions(dialogs, random.Random(0), require_check=True)
    assert all(d.instruction.checks for d in filled)
    with pytest.raises(ValueError, match="has no instruction"):
        sample_answers(dialogs, RuleResponder())
    with pytest.raises(ValueError, match=r"d.jsonl:1: 'users' must be a list"):
        read_gatt_dialogs(write_jsonl(tmp_path / "d.jsonl", [{"users": "repeat: a"}]))


def test_one_sample_per_dialog_and_empty_answers(tmp_path, dialogs):
    def quiet_after_two(views):
        # Answers the first two turns only: the dialogs end there.
        return ["" if len(v) > 3 else "the cat" for v in views]

    summary = write_gatt_data(tmp_path / "g.jsonl", dialogs, quiet_after_two, per_turn=False)
    records = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert summary["dialogs_cut_short"] == len(dialogs) == len(records)
    assert all(r["gatt"]["turn"] == r["gatt"]["turns"] == 2 for r in records)
    assert all(sum(m["role"] == "user" for m in r["messages"]) == 2 for r in records)
