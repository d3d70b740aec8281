"""Rejection sampling on 2 gloo ranks: the argmax is kept, iterations pool, a crashed
iteration resumes without resampling, reward-model scores equal one process, and the kept set
fine-tunes through the SFT loop."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from chat_helpers import (
    WORDS,
    base_checkpoint,
    dialogs,
    make_tokenizer,
    reward_checkpoint,
    write_jsonl,
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llama_dist.checkpoint import load_model_checkpoint
from llama_dist.config import RejectionSamplingJobConfig, register_configs
from llama_dist.data.prompts import read_prompts
from llama_dist.models.llama import Llama
from llama_dist.rlhf.rewards import safety_gated
from llama_dist.rlhf.scoring import RewardModelScorer, WordShareScorer
from llama_dist.testing.distributed import run_distributed
from llama_dist.tokenizer import Tokenizer
from llama_dist.train.rejection_sampling import read_lines, rejection_sampling

ROOT = Path(__file__).resolve().parents[2]
TARGET = WORDS[:6]
NUM_PROMPTS = 10


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rs")
    out = {"tokenizer": make_tokenizer(root), "policy": base_checkpoint(root / "policy")}
    for name, seed in (("helpful_rm", 1), ("safety_rm", 2)):
        out[name] = reward_checkpoint(root / name, seed)
    prompts = [
        {"prompt": d[-2]["content"], "safety_tagged": i % 3 == 0}
        for i, d in enumerate(dialogs(NUM_PROMPTS))
    ]
    out["prompts"] = write_jsonl(root / "prompts.jsonl", prompts)
    return out


def job(files, *args: str) -> RejectionSamplingJobConfig:
    register_configs()
    base = [
        f"policy={files['policy']}",
        f"tokenizer={files['tokenizer']}",
        f"prompts=[{files['prompts']}]",
        "device=cpu",
        "finetune=false",
        "sampling.num_samples=4",
        "sampling.temperatures=[0.7,1.3]",
        "sampling.max_new_tokens=6",
        "sampling.prompts_per_batch=3",
        "scorer.kind=word_share",
        f"scorer.words=[{','.join(TARGET)}]",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("rejection_sampling", overrides=[*base, *args]))


def kept(run_dir: Path, iteration: int) -> dict[str, dict]:
    path = run_dir / f"iter-{iteration}" / "kept.jsonl"
    return {r["prompt_key"]: r for r in map(json.loads, path.read_text().splitlines())}


def first_runs(jobs: dict, tmp: str) -> None:
    tmp = Path(tmp)
    rejection_sampling(jobs["word1"], tmp / "pooled")
    rejection_sampling(jobs["word2"], tmp / "pooled")
    rejection_sampling(jobs["word1"], tmp / "crashed")


def second_runs(jobs: dict, tmp: str) -> dict:
    tmp = Path(tmp)
    rejection_sampling(jobs["word1"], tmp / "crashed")
    # The fine-tuning stopped after its first step (as by a signal), then resumed to the end.
    stopped = copy.deepcopy(jobs["gated"])
    stopped.sft.train.stop_after = 1
    first = rejection_sampling(stopped, tmp / "gated")
    second = rejection_sampling(jobs["gated"], tmp / "gated")
    return {
        "stopped": (first.step, first.stopped, first.planned_steps),
        "finished": (second.step, second.stopped, second.kept.is_file()),
    }


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    jobs = {
        "word1": job(files),
        "word2": job(files, "iteration=2"),
        "gated": job(
            files,
            "scorer.kind=safety_gated",
            f"scorer.helpfulness_rm={files['helpful_rm']}",
            f"scorer.safety_rm={files['safety_rm']}",
            "sampling.temperatures=[1.0]",
            "sampling.num_samples=3",
            "finetune=true",
            "sft.data.seq_len=128",
            "sft.train.global_batch_tokens=256",
            "sft.train.micro_batch=1",
            "sft.train.wandb=false",
            "sft.optim.lr=1e-3",
            "sft.sample.max_new_tokens=4",
        ),
    }
    run_distributed(first_runs, 2, jobs, str(tmp))
    # A crash mid-iteration: each rank's file keeps its first prompt and a line cut short.
    crashed = tmp / "crashed" / "iter-1"
    before = {}
    for path in sorted((crashed / "samples").glob("dp-*.jsonl")):
        lines = path.read_text().splitlines()
        before[path.name] = lines[0]
        path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    for name in ("kept.jsonl", "summary.json", "report.md"):
        (crashed / name).unlink()
    second = run_distributed(second_runs, 2, jobs, str(tmp))
    return {"tmp": tmp, "crashed_first_lines": before, **second}


def test_keeps_the_best_candidate_of_each_prompt(runs, files):
    run_dir = runs["tmp"] / "pooled"
    lines = read_lines(run_dir / "iter-1" / "samples")
    prompts = read_prompts([files["prompts"]])
    assert sorted(line["prompt_key"] for line in lines) == sorted(p.key for p in prompts)
    scorer = WordShareScorer(TARGET)
    best = kept(run_dir, 1)
    for line in lines:
        candidates = line["candidates"]
        assert len(candidates) == 8  # 4 samples x 2 temperatures, nothing to pool yet
        assert {(c["temperature"], c["sample_index"]) for c in candidates} == {
            (t, i) for t in (0.7, 1.3) for i in range(4)
        }
        usable = [c for c in candidates if c["response"]]
        if not usable:
            assert line["prompt_key"] not in best
            continue
        record = best[line["prompt_key"]]
        assert record["reward"] == max(c["reward"] for c in usable)
        assert record["messages"][:-1] == line["dialog"]
        rescored = scorer.score([prompts[0]], [record["messages"][-1]["content"]])
        assert rescored.item() == pytest.approx(record["reward"])
        assert record["iteration"] == 1
    report = (run_dir / "iter-1" / "report.md").read_text()
    assert "| k | max (T=0.7) | median (T=0.7) | max (T=1.3) | median (T=1.3) |" in report
    summary = json.loads((run_dir / "iter-1" / "summary.json").read_text())
    for curve in summary["curves"].values():
        assert all(b >= a - 1e-12 for a, b in zip(curve["max"][:-1], curve["max"][1:], strict=True))
    assert summary["mean_kept_reward"] >= summary["mean_sample_reward"]
    assert (run_dir / "iter-1" / "best_of_k.png").stat().st_size > 1000


def test_a_later_iteration_pools_with_the_earlier_kept_samples(runs):
    run_dir = runs["tmp"] / "pooled"
    first, second = kept(run_dir, 1), kept(run_dir, 2)
    assert set(first) <= set(second)
    for key, record in first.items():
        assert second[key]["reward"] >= record["reward"]  # the earlier best is a candidate
    lines = read_lines(run_dir / "iter-2" / "samples")
    pooled = [c for line in lines for c in line["candidates"] if c.get("pooled")]
    assert len(pooled) == len(first) and all(c["iteration"] == 1 for c in pooled)
    assert {r["iteration"] for r in second.values()} <= {1, 2}


def test_a_crashed_iteration_resumes_without_resampling(runs):
    folder = runs["tmp"] / "crashed" / "iter-1"
    texts = {p.name: p.read_text().splitlines() for p in (folder / "samples").glob("dp-*.jsonl")}
    for name, first_line in runs["crashed_first_lines"].items():
        assert texts[name][0] == first_line  # finished prompts were not sampled again
    lines = read_lines(folder / "samples")
    assert len({line["prompt_key"] for line in lines}) == NUM_PROMPTS == len(lines)
    assert len(kept(runs["tmp"] / "crashed", 1)) == len(kept(runs["tmp"] / "pooled", 1))


def test_reward_model_scores_equal_one_process_and_the_kept_set_fine_tunes(runs, files):
    folder = runs["tmp"] / "gated" / "iter-1"
    lines = read_lines(folder / "samples")
    prompts = {p.key: p for p in read_prompts([files["prompts"]])}
    tokenizer = Tokenizer(str(files["tokenizer"]))
    scorers = []
    for name in ("helpful_rm", "safety_rm"):
        cfg, state_dict = load_model_checkpoint(files[name])
        model = Llama(cfg)
        model.load_state_dict(state_dict)
        scorers.append(
            RewardModelScorer(
                model, tokenizer, device=torch.device("cpu"), micro_batch=5, max_len=128
            )
        )
    pairs = [(prompts[line["prompt_key"]], c) for line in lines for c in line["candidates"]]
    ps, responses = [p for p, _ in pairs], [c["response"] for _, c in pairs]
    helpful, safety = (s.score(ps, responses) for s in scorers)
    tagged = torch.tensor([p.safety_tagged for p in ps])
    expected = safety_gated(helpful, safety, tagged)
    got = torch.tensor([c["reward"] for _, c in pairs])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (expected == safety).any() and (expected == helpful).any()  # both RMs decide
    steps = sorted((folder / "sft" / "checkpoints").glob("step-*"))
    assert steps, "the fine-tuning run saved no checkpoint"
    # Stopped early, the iteration reports it (run_job exits 3); resumed, it finishes.
    step, stopped, planned = runs["stopped"]
    assert (step, stopped) == (1, "train.stop_after=1") and planned > 1
    assert runs["finished"] == (planned, None, True)


def test_bad_rejection_sampling_configs(files, tmp_path):
    cases = {
        "policy is not set": ["policy=null"],
        "needs scorer.reward_model": ["scorer.kind=reward_model"],
        "not a reward model": [
            "scorer.kind=reward_model",
            f"scorer.reward_model={files['policy']}",
        ],
        "positive temperatures": ["sampling.temperatures=[0.0]"],
        "needs scorer.words": ["scorer.words=[]"],
        "run those iterations first": ["iteration=3"],
    }
    for message, args in cases.items():
        with pytest.raises(ValueError, match=message):
            rejection_sampling(job(files, *args), tmp_path / "run")
        assert not (tmp_path / "run").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
