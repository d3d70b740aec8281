"""SFT data: layouts, answer masks, packing, over-long samples, the token cache, bad data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from chat_helpers import BASE, dialogs, make_tokenizer, write_jsonl  # noqa: E402

from llama_dist.data import sft as sft_data  # noqa: E402
from llama_dist.data.chat import encode_dialog  # noqa: E402
from llama_dist.data.sft import (  # noqa: E402
    SFTData,
    SFTDataConfig,
    SFTLoader,
    build_samples,
    load_tokenized,
    pack,
    row_batch,
    to_dialog,
    tokenize_file,
)
from llama_dist.losses import IGNORE_INDEX  # noqa: E402
from llama_dist.models.llama import Llama  # noqa: E402
from llama_dist.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def test_public_layouts_convert_to_the_same_dialog():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "name a cat\n\nred one"},
        {"role": "assistant", "content": "Tom"},
    ]
    alpaca = {
        "instruction": "name a cat",
        "input": "red one",
        "output": "Tom",
        "system": "be brief",
    }
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "name a cat\n\nred one"},
            {"from": "gpt", "value": "Tom"},
        ]
    }
    assert to_dialog({"messages": messages}) == messages
    assert to_dialog(alpaca) == messages
    assert to_dialog(sharegpt) == messages
    assert to_dialog({"instruction": "hi", "input": "", "output": "yo"}) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]


def test_answer_masks_on_known_dialogs(tokenizer):
    enc = tokenizer.encode
    one = [
        {"role": "user", "content": "repeat: the cat"},
        {"role": "assistant", "content": "the cat"},
    ]
    tokens = encode_dialog(tokenizer, one)
    prompt = enc("[INST] repeat: the cat [/INST]", bos=True)
    whole = enc("[INST] repeat: the cat [/INST] the cat ", bos=True, eos=True)
    assert tokens.ids == whole
    # Exactly the answer tokens and the closing eos are trained on.
    assert tokens.answer_mask == [False] * len(prompt) + [True] * (len(whole) - len(prompt))
    assert tokens.last_answer_mask() == tokens.answer_mask

    two = [
        *one,
        {"role": "user", "content": "repeat: a dog"},
        {"role": "assistant", "content": "a dog"},
    ]
    tokens = encode_dialog(tokenizer, two)
    second = enc("[INST] repeat: a dog [/INST] a dog ", bos=True, eos=True)
    second_prompt = enc("[INST] repeat: a dog [/INST]", bos=True)
    first_mask = [False] * len(prompt) + [True] * (len(whole) - len(prompt))
    second_mask = [False] * len(second_prompt) + [True] * (len(second) - len(second_prompt))
    assert tokens.ids == whole + second
    assert tokens.answer_mask == first_mask + second_mask
    # Last turn only: nothing of the first answer.
    assert tokens.last_answer_mask() == [False] * len(whole) + second_mask


def samples_of(tokenizer, tmp_path, records, **kw):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    source = tokenize_file(path, tokenizer, skip_invalid=False)
    return build_samples(
        [source], **{"seq_len": 64, "train_on": "all", "overlong": "truncate", **kw}
    )


def test_packing_keeps_samples_apart(tokenizer, tmp_path):
    samples = samples_of(tokenizer, tmp_path, [{"messages": d} for d in dialogs(6)])
    lengths = [len(t) for t in samples.ids]
    rows = pack(lengths, range(len(lengths)), 128, pack=True)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] - 1 for i in row) <= 128 for row in rows)
    assert any(len(row) > 1 for row in rows)
    batch = row_batch(samples, rows, 128)
    for r, row in enumerate(rows):
        at = 0
        for doc, i in enumerate(row):
            ids, mask = samples.ids[i], samples.labels_mask[i]
            n = len(ids) - 1
            assert batch["tokens"][r, at : at + n].tolist() == ids[:-1].tolist()
            expected = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
            # A sample's last label is its own eos, never the next sample's bos.
            assert batch["labels"][r, at : at + n].tolist() == expected
            assert batch["document_ids"][r, at : at + n].eq(doc).all()
            assert batch["position_ids"][r, at : at + n].tolist() == list(range(n))
            at += n
        assert batch["labels"][r, at:].eq(IGNORE_INDEX).all()  # padding is never a label
        assert batch["document_ids"][r, at:].eq(len(row)).all()


def test_packed_batch_gives_each_sample_its_own_loss(tokenizer, tmp_path):
    samples = samples_of(tokenizer, tmp_path, [{"messages": d} for d in dialogs(8, seed=3)])
    lengths = [len(t) for t in samples.ids]
    rows = pack(lengths, range(len(lengths)), 128, pack=True)
    assert any(len(row) > 1 for row in rows)
    model = Llama(BASE)
    model.init_weights(1)
    batch = row_batch(samples, rows, 128)
    logits = model(
        batch["tokens"], document_ids=batch["document_ids"], position_ids=batch["position_ids"]
    )
    per_token = F.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
    ).view(batch["labels"].shape)
    checked = 0
    for r, row in enumerate(rows):
        for doc, i in enumerate(row):
            alone = row_batch(samples, [[i]], lengths[i] - 1)
            alone_logits = model(alone["tokens"])
            alone_loss = F.cross_entropy(alone_logits[0], alone["labels"][0], reduction="sum")
            packed_loss = per_token[r][batch["document_ids"][r] == doc].sum()
            torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == 8


def test_overlong_samples_are_truncated_or_dropped_and_counted(tokenizer, tmp_path):
    long = [{"role": "user", "content": "repeat: " + " ".join(["cat"] * 60)}]
    long.append({"role": "assistant", "content": " ".join(["cat"] * 60)})
    long_prompt = [{"role": "user", "content": " ".join(["dog"] * 150)}, long[1]]
    records = [{"messages": d} for d in [*dialogs(3), long, long_prompt]]
    kept = samples_of(tokenizer, tmp_path, records, seq_len=100)
    # The long answer survives truncated; the long prompt leaves no answer inside 40 tokens.
    assert kept.stats == {
        "samples": 4,
        "truncated": 1,
        "dropped_overlong": 0,
        "dropped_no_answer": 1,
        "skipped_invalid": 0,
    }
    assert max(len(t) for t in kept.ids) == 101
    dropped = samples_of(tokenizer, tmp_path, records, seq_len=100, overlong="drop")
    assert dropped.stats["samples"] == 3 and dropped.stats["dropped_overlong"] == 2


def test_tokens_are_cached_and_reloaded_without_tokenising(tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": d} for d in dialogs(5)])
    first, hit = load_tokenized(path, tokenizer)
    assert not hit
    assert len(list(tmp_path.glob("d.jsonl.tokens-*"))) == 1

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(sft_data, "encode_dialog", no_tokenising)
    again, hit = load_tokenized(path, tokenizer)
    assert hit
    for name in ("ids", "answer_mask", "last_mask", "offsets"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    # Other contents: another key, so the stale cache is not read.
    write_jsonl(path, [{"messages": d} for d in dialogs(4)])
    with pytest.raises(AssertionError, match="tokenised again"):
        load_tokenized(path, tokenizer)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "does not end with an assistant"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": " "},
                ]
            },
            "empty assistant answer",
        ),
        ({"messages": [{"content": "hi"}]}, "keys 'role' and 'content'"),
        ({"text": "plain text"}, "unknown layout"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "from 'robot'"),
        ({"instruction": "hi", "output": 3}, "string 'output'"),
    ],
)
def test_bad_records_name_file_and_line(tokenizer, tmp_path, record, message):
    good = {"messages": dialogs(1)[0]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, record])
    with pytest.raises(ValueError, match=message) as err:
        load_tokenized(path, tokenizer, cache=False)
    assert f"{path}:3" in str(err.value)
    data, _ = load_tokenized(path, tokenizer, cache=False, skip_invalid=True)
    assert data.num_samples == 2 and len(data.skipped) == 1


def test_bad_files(tokenizer, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(ValueError, match=f"{broken}:2: not valid JSON"):
        load_tokenized(broken, tokenizer, cache=False)
    not_a_list = tmp_path / "obj.json"
    not_a_list.write_text(json.dumps({"messages": []}))
    with pytest.raises(ValueError, match="must hold a list of records"):
        load_tokenized(not_a_list, tokenizer, cache=False)
    as_json = tmp_path / "list.json"
    as_json.write_text(json.dumps([{"messages": dialogs(1)[0]}, {"instruction": "x"}]))
    with pytest.raises(ValueError, match=f"{as_json} record 1"):
        load_tokenized(as_json, tokenizer, cache=False)
    with pytest.raises(ValueError, match="does not exist"):
        SFTDataConfig(paths=[str(tmp_path / "missing.jsonl")]).validate()


def test_loader_resumes_exactly_and_splits_over_ranks(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": d} for d in dialogs(40)])
    data = SFTData(SFTDataConfig(paths=[str(path)], seq_len=128), tokenizer, write_cache=True)
    straight = SFTLoader(data, global_batch=4, micro_batch=1, dp_rank=0, dp_size=1)
    steps = [next(straight) for _ in range(12)]  # crosses epoch boundaries
    resumed = SFTLoader(data, global_batch=4, micro_batch=1, dp_rank=0, dp_size=1)
    resumed.load_state_dict({"consumed_rows": 20})
    for expected in steps[5:]:
        for a, b in zip(next(resumed), expected, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)
    # Two ranks of micro-batches of 2 read the same rows as one rank.
    ranks = [SFTLoader(data, global_batch=4, micro_batch=2, dp_rank=r, dp_size=2) for r in (0, 1)]
    together = torch.cat([m["tokens"] for r in ranks for m in next(r)])
    assert torch.equal(together, torch.cat([m["tokens"] for m in steps[0]]))
    # Every epoch holds every training sample once, in another order.
    epoch0, epoch1 = data.epoch_rows(0), data.epoch_rows(1)
    assert sorted(i for row in epoch0 for i in row) == list(range(40))
    assert epoch0 != epoch1
