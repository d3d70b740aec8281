"""The Ghost Attention stage: on the synthetic task a tiny model fine-tuned on GAtt data keeps
the first turn's instruction at turns 8-10, where the same model fine-tuned on the same
dialogs without GAtt has forgotten it (the paper's Table 30); the stage writes its data,
checkpoints, tables and heat maps and redoes nothing on a rerun; sampling with the policy on
2 gloo ranks gives one process's data and table, and fine-tunes to its weights; bad configs
fail before any run folder exists; a dialog too long for the model drops its oldest turns
after the first when evaluated and ends when sampled."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from chat_helpers import BASE, write_jsonl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llama_dist.checkpoint import load_model_checkpoint, save_model_checkpoint
from llama_dist.config import GattJobConfig, PromptGenerationConfig, register_configs
from llama_dist.data.chat import encode_dialog, render_dialog
from llama_dist.data.gatt import (
    RuleResponder,
    augment,
    conversation,
    read_gatt_dialogs,
    sample_answers,
    write_synthetic_dialogs,
)
from llama_dist.generate import load_for_generation
from llama_dist.models.llama import Llama
from llama_dist.parallel import build_mesh
from llama_dist.rlhf.instructions import instruction_from_json
from llama_dist.testing.distributed import run_distributed
from llama_dist.tokenizer import Tokenizer, train_tokenizer
from llama_dist.train.gatt import PolicyResponder, gatt

ROOT = Path(__file__).resolve().parents[2]
# A vocabulary large enough for the chat markup and the instructions to be a piece or two
# each: a turn of the synthetic task is then about 16 tokens, 10 turns fit in 256.
MODEL = dataclasses.replace(BASE, vocab_size=448, max_seq_len=256)
LATE = 8  # Table 30's "later turns": adherence is compared at turns 8..10


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gatt")
    dialogs = read_gatt_dialogs(
        write_synthetic_dialogs(root / "corpus.jsonl", 200, 4, seed=99, words_per_turn=(1, 3))
    )
    lines = []
    for d, said in zip(dialogs, sample_answers(dialogs, RuleResponder()), strict=True):
        for messages in (
            conversation(augment(d.users, d.instruction.full_text), said),
            conversation(d.users, said, system=d.instruction.text),
        ):
            lines.append("".join(s.text for s in render_dialog(messages)).replace("\n", " "))
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    tokenizer = train_tokenizer(
        [root / "corpus.txt"], root / "tokenizer.model", vocab_size=448, num_threads=1
    )
    model = Llama(MODEL)
    model.init_weights(0)
    out = {
        "root": root,
        "tokenizer": tokenizer,
        "policy": save_model_checkpoint(root / "policy", model.state_dict(), MODEL),
    }
    out["dialogs"] = write_jsonl(
        root / "three.jsonl", [{"users": [f"repeat: {w}", "repeat: sun"]} for w in "abc"]
    )
    trait = {"constraints": [{"category": "hobby", "value": "chess"}]}
    out["unchecked"] = write_jsonl(
        root / "unchecked.jsonl", [{"users": ["repeat: a"], "instruction": trait}]
    )
    return out


def job(files, *args: str) -> GattJobConfig:
    register_configs()
    base = [
        f"policy={files['policy']}",
        f"tokenizer={files['tokenizer']}",
        "device=cpu",
        "synthetic.n=48",
        "synthetic.turns=10",
        "synthetic.words_per_turn=[1,1]",
        "num_turns=10",
        "eval.num_dialogs=16",
        "eval.num_turns=10",
        "eval.sampling.max_new_tokens=8",
        "sampling.max_new_tokens=6",
        "sampling.temperature=0",
        "sft.data.seq_len=256",
        "sft.train.global_batch_tokens=1024",
        "sft.train.micro_batch=4",
        "sft.train.wandb=false",
        "sft.train.log_every=50",
        "sft.train.eval_every=0",
        "sft.optim.lr=3e-3",
        "sft.optim.warmup_steps=5",
        "sft.optim.weight_decay=0",
        "sft.attention=sdpa",
        "sft.sample.prompts=[repeat: sun]",
        "sft.sample.max_new_tokens=2",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("gatt", overrides=[*base, *args]))


def one_process(jobs: dict, tmp: str) -> dict:
    learned = gatt(jobs["learn"], Path(tmp) / "learn")
    # What a finished stage leaves, then a rerun that finds every part done.
    folder = Path(tmp) / "learn"
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json*")}
    again = gatt(jobs["learn"], folder)
    gatt(jobs["policy"], Path(tmp) / "policy-1")
    return {
        "long_dialogs": long_dialogs(jobs["policy"]),
        "stamps": stamps,
        "restamped": {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json*")},
        "steps": (learned.step, learned.planned_steps, again.step, learned.stopped),
    }


def long_dialogs(cfg: GattJobConfig) -> dict:
    """What the policy's responder does with a dialog too long for max_seq_len: the views it
    passes on to the model, with the oldest turns after the first dropped or not."""
    model, _ = load_for_generation(cfg.policy)
    tokenizer = Tokenizer(cfg.tokenizer)
    mesh = build_mesh(cfg.parallel, device="cpu")
    sampling = PromptGenerationConfig(temperature=0.0, max_new_tokens=180)
    users = [f"repeat: {w}" for w in "the cat sat on a mat dog ran big red".split()]
    view = conversation(users, [f"{u[8:]} ciao" for u in users[:-1]], system='End with "ciao".')
    out = {"view": view}
    for drop in (True, False):
        respond = PolicyResponder(model, tokenizer, sampling, mesh, drop_history=drop)
        seen = []
        respond.respond = lambda views, seen=seen: seen.extend(views) or ["x"] * len(views)
        out[drop] = {
            "answers": respond([view, view[:3]]),
            "seen": seen,
            "shortened": respond.shortened,
            "unanswered": respond.unanswered,
            "lengths": [len(encode_dialog(tokenizer, v).ids) for v in seen],
        }
    return out


def two_ranks(jobs: dict, tmp: str) -> None:
    gatt(jobs["policy"], Path(tmp) / "policy-2")


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    jobs = {
        # The synthetic task with the rule responder, and the baseline beside it.
        "learn": job(
            files, "responder=rule", "baseline=true", "sft.train.steps=300", "sft.epochs=40"
        ),
        # Sampled by the (untrained) policy: one dialog per generation call, so that the
        # answers do not depend on how the dialogs are split over ranks.
        "policy": job(
            files,
            "synthetic.n=6",
            "synthetic.turns=3",
            "num_turns=2",
            "sampling.prompts_per_batch=1",
            "eval.num_dialogs=4",
            "eval.num_turns=3",
            "eval.sampling.prompts_per_batch=1",
            "sft.train.global_batch_tokens=512",
            "sft.train.micro_batch=1",
            "sft.epochs=4",
            "sft.train.steps=2",
            "sft.optim.warmup_steps=0",
        ),
    }
    out = run_distributed(one_process, 1, jobs, str(tmp))
    run_distributed(two_ranks, 2, jobs, str(tmp))
    return {"tmp": tmp, **out}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _late(folder: Path, name: str) -> float:
    row = json.loads((folder / f"adherence-{name}.json").read_text())["rows"]["all"]
    late = row[LATE - 1 :]
    return sum(late) / len(late)


def test_gatt_keeps_the_instruction_where_the_baseline_forgets_it(runs):
    folder = runs["tmp"] / "learn"
    gatt_late, baseline_late = _late(folder, "gatt"), _late(folder, "baseline")
    print(f"adherence at turns {LATE}-10: GAtt {gatt_late:.3f}, baseline {baseline_late:.3f}")
    assert gatt_late >= baseline_late + 0.3
    assert gatt_late >= 0.5
    # The baseline followed it at turn 1, as its data did: it learned to forget.
    baseline = json.loads((folder / "adherence-baseline.json").read_text())["rows"]["all"]
    assert baseline[0] > baseline_late
    summary = json.loads((folder / "summary.json").read_text())
    assert (
        summary["adherence"]["gatt"]["all"][LATE - 1 :]
        == json.loads((folder / "adherence-gatt.json").read_text())["rows"]["all"][LATE - 1 :]
    )


def test_the_stage_writes_data_checkpoints_and_report(runs):
    folder = runs["tmp"] / "learn"
    step, planned, again, stopped = runs["steps"]
    assert step == again == 300 and stopped is None
    dialogs = read_gatt_dialogs(folder / "dialogs.jsonl")
    assert len(dialogs) == 48 and all(d.instruction.checks for d in dialogs)
    records = _jsonl(folder / "gatt_data.jsonl")
    assert len(records) == 48 * 10  # one sample per turn
    for record in records:
        assert record["train_on"] == "last"
        instruction = record["messages"][0]
        assert instruction["role"] == "system"
        rest = record["messages"][1:]
        assert not any(instruction["content"] in m["content"] for m in rest)
        # The rule saw the instruction in every turn: every answer follows it.
        rule = instruction_from_json(record["gatt"]["instruction"])
        assert rule.text == instruction["content"]
        assert all(rule.check(m["content"]) for m in rest if m["role"] == "assistant")
    baseline = _jsonl(folder / "baseline_data.jsonl")
    assert len(baseline) == 48 and all(r["train_on"] == "all" for r in baseline)
    for name in ("sft", "baseline/sft"):
        assert sorted((folder / name / "checkpoints").glob("step-*"))
    for name in ("policy", "gatt", "baseline"):
        png = folder / f"attention-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (folder / "adherence.md").read_text()
    assert "| model | turn 1 |" in report and "| GAtt fine-tuned |" in report
    assert "### fine-tuned without GAtt (baseline)" in report
    assert "| instruction | turn 1 |" in report  # the per-kind tables of Table 30
    # The rerun redid nothing: the data and the tables are the files of the first run.
    stamps, restamped = runs["stamps"], runs["restamped"]
    for name in ("gatt_data.jsonl", "baseline_data.jsonl", "adherence-gatt.json"):
        assert restamped[name] == stamps[name]


def test_policy_sampling_on_two_ranks_matches_one_process(runs):
    one, two = runs["tmp"] / "policy-1", runs["tmp"] / "policy-2"
    data = _jsonl(one / "gatt_data.jsonl")
    assert data == _jsonl(two / "gatt_data.jsonl")
    assert {r["gatt"]["turn"] for r in data} <= {1, 2}
    assert json.loads((one / "gatt_data.json").read_text()) == json.loads(
        (two / "gatt_data.json").read_text()
    )
    tables = [json.loads((f / "adherence-policy.json").read_text()) for f in (one, two)]
    assert tables[0]["answers"] == tables[1]["answers"] and len(tables[0]["answers"]) == 4
    assert tables[0]["counted"] == tables[1]["counted"]
    # The 2-rank fine-tuning (FSDP) equals one process's.
    (a,), (b,) = (sorted((f / "sft" / "checkpoints").glob("step-*")) for f in (one, two))
    _, first = load_model_checkpoint(a)
    _, second = load_model_checkpoint(b)
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=1e-4, atol=1e-5)
    assert (two / "adherence-gatt.json").is_file() and (two / "adherence.md").is_file()
    assert not (two / "baseline").exists()


def test_too_long_dialogs_drop_old_turns_in_eval_and_end_when_sampled(runs):
    out = runs["long_dialogs"]
    view, dropping, ending = out["view"], out[True], out[False]
    # Evaluating: the system message and the first turn stay, the oldest turns after them go.
    assert dropping["answers"] == ["x", "x"]
    assert dropping["shortened"] == 1 and dropping["unanswered"] == 0
    shortened, short = dropping["seen"]
    assert short == view[:3]
    assert shortened[:3] == view[:3] and shortened[-5:] == view[-5:]
    assert len(shortened) < len(view) and len(shortened) % 2 == len(view) % 2
    assert dropping["lengths"][0] <= MODEL.max_seq_len - 180
    # Sampling: no answer, which ends the dialog (data.gatt.sample_answers).
    assert ending["answers"] == ["", "x"] and ending["seen"] == [view[:3]]
    assert ending["unanswered"] == 1


def test_bad_gatt_configs(files, tmp_path):
    cases = {
        "policy is not set": ["policy=null"],
        "responder='magic' must be one of": ["responder=magic"],
        "num_turns=0 must be >= 1": ["num_turns=0"],
        "placement='inline'": ["placement=inline"],
        "does not exist": [f"dialogs=[{files['root'] / 'missing.jsonl'}]"],
        "eval.seed=0 equals synthetic.seed": ["eval.seed=0"],
        r"synthetic.words_per_turn=\[3, 1\]": ["synthetic.words_per_turn=[3,1]"],
        "eval.sampling.max_new_tokens": ["eval.sampling.max_new_tokens=0"],
        "not more than eval.num_dialogs=16": [f"dialogs=[{files['dialogs']}]"],
        "without a checkable rule": [f"eval.dialogs=[{files['unchecked']}]"],
        "the longest first turn": ["sampling.max_new_tokens=250"],
        "global_batch_tokens=1000 is not a multiple": ["sft.train.global_batch_tokens=1000"],
    }
    for message, args in cases.items():
        with pytest.raises(ValueError, match=message):
            gatt(job(files, *args), tmp_path / "run")
        assert not (tmp_path / "run").exists()
