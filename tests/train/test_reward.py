"""The reward-model loop on 2 gloo ranks: it learns a known rule, matches one process, resumes
exactly, runs on TP and from an HF folder, mixes sources, and runs under torchrun."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from chat_helpers import base_checkpoint, make_tokenizer
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llama_dist.checkpoint import load_model_checkpoint
from llama_dist.checkpoint.init import load_initial_weights, source_config
from llama_dist.config import RewardJobConfig, register_configs
from llama_dist.data.preference import (
    BAD_WORDS,
    GOOD_WORDS,
    NEUTRAL_WORDS,
    write_synthetic_preferences,
)
from llama_dist.data.reward_data import RewardData
from llama_dist.metrics.logger import read_metrics
from llama_dist.models.hf_adapter import save_hf_folder
from llama_dist.models.llama import Llama
from llama_dist.models.reward import HEAD_KEY, reward_config
from llama_dist.rlhf.ranking import margin_table, rating_margins, reward_model_loss
from llama_dist.testing.distributed import run_distributed
from llama_dist.tokenizer import Tokenizer
from llama_dist.train.reward import EVAL_FILE, pair_rewards, train_reward_model

ROOT = Path(__file__).resolve().parents[2]
PROMPT_WORDS = ("tell", "me", "about", "rivers", "music", "gardens", "stars", "bread", "trains")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rm")
    words = (*GOOD_WORDS, *BAD_WORDS, *NEUTRAL_WORDS, *PROMPT_WORDS, "answer", "briefly")
    out = {"tokenizer": make_tokenizer(root, words), "ckpt": base_checkpoint(root / "base")}
    cfg, state_dict = load_model_checkpoint(out["ckpt"])
    out["hf"] = save_hf_folder(state_dict, cfg, root / "base_hf")
    out["helpful"] = write_synthetic_preferences(root / "helpful.jsonl", num_pairs=1000)
    out["safety"] = write_synthetic_preferences(
        root / "safety.jsonl", num_pairs=1200, seed=1, unsafe_fraction=0.6, rule="safety"
    )
    out["safe_helpful"] = write_synthetic_preferences(
        root / "safe_helpful.jsonl", num_pairs=300, seed=2, unsafe_fraction=0.0, rule="safety"
    )
    return out


def overrides(files: dict[str, Path], init_from: Path | None = None) -> list[str]:
    return [
        f"init_from={init_from or files['ckpt']}",
        f"tokenizer={files['tokenizer']}",
        f"data.paths=[{files['helpful']}]",
        "data.max_len=128",
        "data.valid_fraction=0.2",
        "train.global_batch_pairs=32",
        "train.micro_batch=8",
        "train.device=cpu",
        "train.wandb=false",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.every=100",
        "optim.lr=3e-3",
        "epochs=2",
    ]


def reward_job(*args: str, config_name: str = "reward") -> RewardJobConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name, overrides=list(args)))


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir, "train")}


def run(cfg: RewardJobConfig, run_dir: Path, **train) -> dict[int, float]:
    cfg = copy.deepcopy(cfg)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    train_reward_model(cfg, run_dir)
    return losses(run_dir)


def two_rank_runs(jobs: dict[str, RewardJobConfig], tmp: str) -> dict:
    tmp = Path(tmp)
    out = {"learn": run(jobs["fsdp"], tmp / "learn")}
    out["learn_valid"] = records(tmp / "learn", "valid")
    out["learn_report"] = (tmp / "learn" / EVAL_FILE).read_text()
    out["straight"] = run(jobs["fsdp"], tmp / "straight", steps=6)
    run(jobs["fsdp"], tmp / "resumed", steps=6, stop_after=3)
    out["first_part"] = losses(tmp / "resumed")
    out["resumed"] = run(jobs["fsdp"], tmp / "resumed", steps=6)
    out["tp"] = run(jobs["tp"], tmp / "tp", steps=6, stop_after=2)
    out["from_hf"] = run(jobs["from_hf"], tmp / "hf", steps=6, stop_after=2)
    out["margin"] = run(jobs["margin"], tmp / "margin", steps=1)
    out["safety"] = run(jobs["safety"], tmp / "safety")
    out["safety_valid"] = records(tmp / "safety", "valid")
    out["safety_data"] = records(tmp / "safety", "data")
    out["safety_report"] = (tmp / "safety" / EVAL_FILE).read_text()
    return out


@pytest.fixture(scope="module")
def jobs(files) -> dict[str, RewardJobConfig]:
    base = overrides(files)
    mix = [
        *[a for a in base if not a.startswith(("data.paths", "epochs"))],
        f"data.sources.safety.paths=[{files['safety']}]",
        f"data.sources.helpful.paths=[{files['safe_helpful']}]",
        "epochs=3",
    ]
    return {
        "fsdp": reward_job(*base),
        "tp": reward_job(*base, "parallel=tp", "parallel.tp=2"),
        "from_hf": reward_job(*overrides(files, files["hf"])),
        "margin": reward_job(*base, "loss.margin=large", "loss.safety_weight=0.5"),
        "safety": reward_job(*mix, config_name="reward_safety"),
    }


@pytest.fixture(scope="module")
def results(jobs, tmp_path_factory):
    return run_distributed(two_rank_runs, 2, jobs, str(tmp_path_factory.mktemp("runs")))


def test_reward_model_learns_the_synthetic_rule(results):
    first, last = results["learn_valid"][0], results["learn_valid"][-1]
    assert first["step"] == 0 and last["step"] == 50  # 2 epochs of 800 pairs, 32 per step
    assert first["accuracy"] < 0.7
    assert last["accuracy"] >= 0.95  # held out
    for bucket in ("significantly_better", "better", "slightly_better", "negligibly_better"):
        assert last[f"data_acc_{bucket}"] >= 0.9
    report = results["learn_report"]
    assert "| | Significantly Better | Better | Slightly Better |" in report
    assert "(200) |" in report  # 20% of 1000 pairs held out


def test_first_step_loss_matches_one_process(results, jobs, files):
    """Step 1 of the 2-rank run (margin table and safety term on) against the loss of the
    same global batch computed in one process from the same initial weights."""
    cfg = copy.deepcopy(jobs["margin"])
    cfg.data.validate()
    data = RewardData(cfg.data, Tokenizer(str(files["tokenizer"])))
    model_cfg = reward_config(source_config(str(files["ckpt"])))
    model = Llama(model_cfg)
    model.init_weights(cfg.train.seed)
    load_initial_weights(model, str(files["ckpt"]), skip=(HEAD_KEY,))
    batch = data.batch(data.epoch_items(0)[: cfg.train.global_batch_pairs])
    with torch.no_grad():
        chosen, rejected = pair_rewards(model, batch, torch.device("cpu"))
        expected = reward_model_loss(
            chosen,
            rejected,
            margin=rating_margins(batch["rating_ids"], margin_table("large")),
            chosen_safe=batch["chosen_safe"],
            rejected_safe=batch["rejected_safe"],
            safety_weight=0.5,
            reduction="sum",
        ) / len(chosen)
    assert results["margin"][1] == pytest.approx(float(expected), abs=1e-5)
    assert abs(results["margin"][1] - results["straight"][1]) > 0.1  # the margin counts


def test_reward_model_resumes_exactly(results):
    assert sorted(results["first_part"]) == [1, 2, 3]
    assert results["resumed"] == results["straight"]  # bitwise


def test_tensor_parallel_and_hf_start_match_fsdp(results):
    for step in (1, 2):
        assert results["tp"][step] == pytest.approx(results["straight"][step], abs=1e-5)
        assert results["from_hf"][step] == pytest.approx(results["straight"][step], abs=1e-5)


def test_safety_mix_with_auxiliary_term(results):
    (data,) = results["safety_data"]
    # 90/10 of 960 safety and 240 helpful training pairs: all of the safety pairs.
    assert data["safety_per_epoch"] == 960 and data["helpful_per_epoch"] == 107
    last = results["safety_valid"][-1]
    assert last["safety_acc_avg"] >= 0.9
    assert last["safety_unsafe_recall"] >= 0.9
    assert "helpful_unsafe_recall" not in last  # no unsafe response there
    report = results["safety_report"]
    assert "| safety |" in report and "| helpful |" in report and "| all |" in report
    assert "Unsafe-response recall" in report


def test_bad_reward_configs_fail_before_any_work(files, tmp_path):
    base = overrides(files)
    cases = {
        "init_from is not set": [*base, "init_from=null"],
        "tokenizer is not set": [*base, "tokenizer=null"],
        "unknown margin table": [*base, "loss.margin=huge"],
        "needs loss.custom_margins": [*base, "loss.margin=custom"],
        "not divisible by train.micro_batch": [*base, "train.micro_batch=5"],
        "fewer than one global batch": [*base, "train.global_batch_pairs=4096"],
        "does not exist": [*base, f"data.paths=[{tmp_path / 'none.jsonl'}]"],
    }
    for message, args in cases.items():
        with pytest.raises(ValueError, match=message):
            train_reward_model(reward_job(*args), tmp_path / "run")
        assert not (tmp_path / "run").exists()
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text(
        "".join(
            line.replace(', "chosen_safe": true', "").replace(', "chosen_safe": false', "")
            for line in Path(files["helpful"]).read_text().splitlines(keepends=True)
        )
        .replace(', "rejected_safe": true', "")
        .replace(', "rejected_safe": false', "")
    )
    job = reward_job(*base, f"data.paths=[{unlabelled}]", "loss.safety_weight=1.0")
    with pytest.raises(ValueError, match="no pair carries chosen_safe"):
        train_reward_model(job, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_launch_reward_under_torchrun_with_resume_and_hf_export(files, tmp_path, offline):
    transformers = pytest.importorskip("transformers")
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "llama_dist.torchrun",  # torchrun, passing on the trainers' exit codes
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "launch" / "reward.py"),
        *overrides(files),
        "train.steps=4",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    first = subprocess.run([*cmd, "train.stop_after=2"], capture_output=True, text=True, env=env)
    # Stopped before its last step: exit code 3, saying how to resume.
    assert first.returncode == 3, first.stderr[-3000:]
    assert "stopped at step 2 of" in first.stderr and "run the same command again" in first.stderr
    assert sorted(losses(run_dir)) == [1, 2]
    second = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert "Significantly Better" in second.stdout and (run_dir / EVAL_FILE).is_file()

    # The trained model exported as LlamaForSequenceClassification scores like ours.
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    export = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "convert.py"),
            "--to-hf",
            str(last),
            "--out",
            str(tmp_path / "hf"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert "wrote HF LlamaForSequenceClassification folder" in export.stdout
    cfg, state_dict = load_model_checkpoint(last)
    model = Llama(cfg)
    model.load_state_dict(state_dict)
    job = reward_job(*overrides(files))
    job.data.validate()
    data = RewardData(job.data, Tokenizer(str(files["tokenizer"])))
    batch = data.batch([(0, int(i)) for i in data.valid_ids[0][:8]])
    hf = transformers.LlamaForSequenceClassification.from_pretrained(
        tmp_path / "hf", local_files_only=True
    ).eval()
    with torch.no_grad():
        chosen, rejected = pair_rewards(model.eval(), batch, torch.device("cpu"))
        theirs = hf(input_ids=batch["tokens"]).logits.squeeze(-1)
    torch.testing.assert_close(theirs, torch.cat([chosen, rejected]), rtol=0, atol=1e-5)
