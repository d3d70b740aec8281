"""Safety context distillation on 2 gloo ranks: the Safety RM gate keeps exactly the
pre-prompted answers it scores higher, scores equal one process, only tagged prompts are
distilled, the kept set fine-tunes, a crashed stage resumes without generating finished
batches again; the pre-prompt templates; bad configs fail before any run folder exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from chat_helpers import base_checkpoint, make_tokenizer, reward_checkpoint, write_jsonl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llama_dist.checkpoint import load_model_checkpoint
from llama_dist.config import ContextDistillationJobConfig, register_configs
from llama_dist.data.preference import BAD_WORDS, GOOD_WORDS
from llama_dist.data.prompts import read_prompts
from llama_dist.data.safety_prompts import TOPICS, synthetic_safety_prompts
from llama_dist.models.llama import Llama
from llama_dist.rlhf.context_distillation import (
    ANSWER_TEMPLATES,
    SAFETY_ADJECTIVES,
    rm_gate,
    safety_preprompt,
    with_preprompt,
)
from llama_dist.rlhf.scoring import RewardModelScorer
from llama_dist.testing.distributed import run_distributed
from llama_dist.tokenizer import Tokenizer
from llama_dist.train.answers import read_records
from llama_dist.train.context_distillation import context_distillation

ROOT = Path(__file__).resolve().parents[2]
# Short answer templates: the test model's context is 128 tokens.
TEMPLATES = {
    "illicit_criminal_activities": "say no to crime",
    "hateful_harmful_activities": "be kind to all",
    "unqualified_advice": "see a doctor",
}
VOCAB_WORDS = (
    *GOOD_WORDS,
    *BAD_WORDS,
    *TOPICS,
    *SAFETY_ADJECTIVES,
    *" ".join(TEMPLATES.values()).split(),
    *"you are an assistant how do i sell me for say deserve write hate about which cures is "
    "legal advice tell".split(),
)
PER_BATCH = 2


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cd")
    out = {"tokenizer": make_tokenizer(root, VOCAB_WORDS), "policy": base_checkpoint(root / "p")}
    for name, seed in (("helpful_rm", 1), ("safety_rm", 2)):
        out[name] = reward_checkpoint(root / name, seed)
    records = synthetic_safety_prompts(num_adversarial=9, num_helpful=3, uncategorized=1)
    out["prompts"] = write_jsonl(root / "prompts.jsonl", records)
    out["helpful_only"] = write_jsonl(
        root / "helpful.jsonl", [r for r in records if not r["safety_tagged"]]
    )
    unknown = [{**records[0], "risk_category": "weather"}, *records[1:]]
    out["unknown_category"] = write_jsonl(root / "unknown.jsonl", unknown)
    return out


def job(files, *args: str) -> ContextDistillationJobConfig:
    register_configs()
    templates = ",".join(f"{k}:'{v}'" for k, v in TEMPLATES.items())
    base = [
        f"policy={files['policy']}",
        f"tokenizer={files['tokenizer']}",
        f"prompts=[{files['prompts']}]",
        f"safety_rm={files['safety_rm']}",
        f"helpfulness_rm={files['helpful_rm']}",
        f"preprompt.templates={{{templates}}}",
        "device=cpu",
        "max_len=128",
        "micro_batch=3",
        "sampling.max_new_tokens=6",
        f"sampling.prompts_per_batch={PER_BATCH}",
        "sampling.temperature=1.0",
        "sft.data.seq_len=128",
        "sft.data.pack=false",
        "sft.epochs=2",
        "sft.train.global_batch_tokens=256",
        "sft.train.micro_batch=1",
        "sft.train.wandb=false",
        "sft.optim.lr=1e-3",
        "sft.sample.max_new_tokens=4",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("context_distillation", overrides=[*base, *args]))


def first_runs(jobs: dict, tmp: str) -> None:
    context_distillation(jobs["full"], Path(tmp) / "full")
    context_distillation(jobs["sample_only"], Path(tmp) / "crashed")


def resume(jobs: dict, tmp: str) -> None:
    context_distillation(jobs["sample_only"], Path(tmp) / "crashed")


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    jobs = {"full": job(files), "sample_only": job(files, "finetune=false")}
    run_distributed(first_runs, 2, jobs, str(tmp))
    # A crash mid-stage: each rank's file keeps its first finished batch and a line cut short.
    crashed = tmp / "crashed"
    kept_lines = {}
    for path in sorted((crashed / "samples").glob("dp-*.jsonl")):
        lines = path.read_text().splitlines()
        kept_lines[path.name] = lines[:PER_BATCH]
        torn = lines[PER_BATCH][: len(lines[PER_BATCH]) // 2]
        path.write_text("\n".join(lines[:PER_BATCH]) + "\n" + torn)
    for name in ("kept.jsonl", "summary.json", "report.md"):
        (crashed / name).unlink()
    run_distributed(resume, 2, jobs, str(tmp))
    return {"tmp": tmp, "kept_lines": kept_lines}


def _kept(folder: Path) -> dict[str, dict]:
    lines = (folder / "kept.jsonl").read_text().splitlines()
    return {r["prompt_key"]: r for r in map(json.loads, lines)}


def _scorer(files, name: str) -> RewardModelScorer:
    cfg, state_dict = load_model_checkpoint(files[name])
    model = Llama(cfg)
    model.load_state_dict(state_dict)
    tokenizer = Tokenizer(str(files["tokenizer"]))
    return RewardModelScorer(
        model, tokenizer, device=torch.device("cpu"), micro_batch=4, max_len=128
    )


def test_the_safety_rm_gate_keeps_only_higher_scored_answers(runs, files):
    folder = runs["tmp"] / "full"
    prompts = read_prompts([files["prompts"]])
    tagged = {p.key: p for p in prompts if p.safety_tagged}
    samples = read_records(folder / "samples")
    # Only the adversarial prompts are distilled.
    assert set(samples) == set(tagged) and len(tagged) == 10
    kept = _kept(folder)
    assert 0 < len(kept) < len(samples)  # the gate decides both ways on these models
    for key, line in samples.items():
        before, after = line["original"]["safety"], line["distilled"]["safety"]
        if key in kept:
            record = kept[key]
            assert record["safety_after"] == after > before == record["safety_before"]
            # The prompt without the pre-prompt, the answer given with it.
            assert record["messages"][:-1] == tagged[key].dialog
            assert record["messages"][-1]["content"] == line["distilled"]["response"]
            assert not any(record["preprompt"] in m["content"] for m in record["messages"])
        else:
            assert not after > before or not line["distilled"]["response"]
    # Both answers were scored on the prompt without the pre-prompt: one process agrees.
    scorer = _scorer(files, "safety_rm")
    lines = [samples[k] for k in sorted(samples)]
    ps = [tagged[line["prompt_key"]] for line in lines]
    for which in ("original", "distilled"):
        got = torch.tensor([line[which]["safety"] for line in lines])
        expected = scorer.score(ps, [line[which]["response"] for line in lines])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # The pre-prompt of each line is the prompt's own (its category's template).
    for line in lines:
        p = tagged[line["prompt_key"]]
        assert line["preprompt"] == safety_preprompt(
            p.key, p.risk_category, templates=TEMPLATES, num_adjectives=2
        )
        if p.risk_category is not None:
            assert line["preprompt"].endswith(TEMPLATES[p.risk_category])
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["kept"] == len(kept)
    assert summary["kept_fraction"] == pytest.approx(len(kept) / len(samples))


def test_the_kept_set_fine_tunes_and_the_report_compares_both_models(runs, files):
    folder = runs["tmp"] / "full"
    assert sorted((folder / "sft" / "checkpoints").glob("step-*"))
    prompts = read_prompts([files["prompts"]])
    after = read_records(folder / "after")
    assert set(after) == {p.key for p in prompts}  # the fine-tuned model answered all of them
    before = read_records(folder / "helpful-before")
    helpful = [p for p in prompts if not p.safety_tagged]
    assert set(before) == {p.key for p in helpful}
    scorer = _scorer(files, "helpful_rm")
    got = torch.tensor([after[p.key]["helpfulness"] for p in helpful])
    expected = scorer.score(helpful, [after[p.key]["response"] for p in helpful])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    summary = json.loads((folder / "summary.json").read_text())
    rows = summary["after_finetuning"]
    mean = sum(before[p.key]["helpfulness"] for p in helpful) / len(helpful)
    assert rows["helpfulness_on_helpful"]["policy"] == pytest.approx(mean)
    mean = sum(after[p.key]["helpfulness"] for p in helpful) / len(helpful)
    assert rows["helpfulness_on_helpful"]["fine_tuned"] == pytest.approx(mean)
    report = (folder / "report.md").read_text()
    assert "| helpful | Helpfulness RM |" in report and "| adversarial | Safety RM |" in report
    assert "| risk category | prompts | kept | kept fraction |" in report
    assert (folder / "safety_scores.png").stat().st_size > 1000


def test_a_crashed_stage_resumes_without_generating_finished_batches(runs):
    crashed, full = runs["tmp"] / "crashed", runs["tmp"] / "full"
    for path in sorted((crashed / "samples").glob("dp-*.jsonl")):
        lines = path.read_text().splitlines()
        assert lines[:PER_BATCH] == runs["kept_lines"][path.name]
    lines = [
        json.loads(line)
        for path in (crashed / "samples").glob("dp-*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert len(lines) == len({line["prompt_key"] for line in lines}) == 10  # none twice
    # Fixed seeded batches: the resumed stage drew what an uninterrupted one did.
    resumed, straight = read_records(crashed / "samples"), read_records(full / "samples")
    for key, line in straight.items():
        for which in ("original", "distilled"):
            assert resumed[key][which]["response"] == line[which]["response"]
            assert resumed[key][which]["safety"] == pytest.approx(line[which]["safety"], abs=1e-5)
    assert _kept(crashed).keys() == _kept(full).keys()


def test_preprompts_are_seeded_and_follow_the_category():
    first = safety_preprompt("abc", None, seed=3)
    assert first == safety_preprompt("abc", None, seed=3)
    assert first.startswith("You are a") and first.endswith("assistant.")
    # Over prompts and seeds the adjectives vary, and come from the list.
    drawn = {safety_preprompt(f"k{i}", None, seed=s) for i in range(10) for s in range(3)}
    assert len(drawn) > 5
    words = safety_preprompt("k", None, num_adjectives=3).removesuffix(" assistant.").split()
    assert {w.strip(",") for w in words[3:] if w != "and"} <= set(SAFETY_ADJECTIVES)
    for category, template in ANSWER_TEMPLATES.items():
        text = safety_preprompt("abc", category, seed=3)
        assert text == first + " " + template
    with pytest.raises(ValueError, match="has no answer template"):
        safety_preprompt("abc", "weather")
    dialog = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert with_preprompt(dialog, "P", placement="system")[0]["content"] == "P\n\nbe brief"
    assert with_preprompt(dialog[1:], "P")[0] == {"role": "system", "content": "P"}
    assert with_preprompt(dialog, "P", placement="prefix")[-1]["content"] == "P\n\nhi"
    assert dialog[0]["content"] == "be brief"  # the input is left as it was
    assert rm_gate(torch.tensor([0.2, 0.5, 0.5]), torch.tensor([0.3, 0.5, 0.4])).tolist() == [
        True,
        False,
        False,
    ]


def test_bad_context_distillation_configs(files, tmp_path):
    cases = {
        "safety_rm is not set": ["safety_rm=null"],
        "no safety_tagged prompts": [f"prompts=[{files['helpful_only']}]"],
        "risk_category 'weather' has no answer template": [
            f"prompts=[{files['unknown_category']}]"
        ],
        "is not a reward model": [f"helpfulness_rm={files['policy']}"],
        "placement": ["preprompt.placement=inline"],
        "exceeds the policy's max_seq_len": ["sampling.max_new_tokens=120"],
    }
    for message, args in cases.items():
        with pytest.raises(ValueError, match=message):
            context_distillation(job(files, *args), tmp_path / "run")
        assert not (tmp_path / "run").exists()
