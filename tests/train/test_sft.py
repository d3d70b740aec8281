"""The SFT loop on 2 gloo ranks: exact resume, any layout, start from an HF folder, and the
real entry point under torchrun."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from chat_helpers import base_checkpoint, dialogs, make_tokenizer, write_jsonl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llama_dist.checkpoint import load_model_checkpoint
from llama_dist.config import SFTJobConfig, register_configs
from llama_dist.metrics.logger import read_metrics
from llama_dist.models.hf_adapter import save_hf_folder
from llama_dist.testing.distributed import run_distributed
from llama_dist.train.sft import sft

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    out = {"tokenizer": make_tokenizer(root), "ckpt": base_checkpoint(root / "base")}
    out["data"] = write_jsonl(root / "dialogs.jsonl", [{"messages": d} for d in dialogs(48)])
    cfg, state_dict = load_model_checkpoint(out["ckpt"])
    out["hf"] = save_hf_folder(state_dict, cfg, root / "base_hf")
    return out


def overrides(files: dict[str, Path], init_from: Path | None = None) -> list[str]:
    return [
        f"init_from={init_from or files['ckpt']}",
        f"tokenizer={files['tokenizer']}",
        f"data.paths=[{files['data']}]",
        "data.seq_len=128",
        "data.valid_fraction=0.1",
        "train.global_batch_tokens=512",
        "train.micro_batch=1",
        "train.device=cpu",
        "train.wandb=false",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.every=100",
        "optim.lr=3e-3",
        "epochs=2",
        "sample.max_new_tokens=8",
    ]


def sft_job(*args: str) -> SFTJobConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("sft", overrides=list(args)))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def run(cfg: SFTJobConfig, run_dir: Path, **train) -> dict[int, float]:
    cfg = copy.deepcopy(cfg)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    sft(cfg, run_dir)
    return losses(run_dir)


def two_rank_runs(fsdp: SFTJobConfig, tp: SFTJobConfig, from_hf: SFTJobConfig, tmp: str):
    tmp = Path(tmp)
    out = {"straight": run(fsdp, tmp / "straight")}
    run(fsdp, tmp / "resumed", stop_after=3)
    out["first_part"] = losses(tmp / "resumed")
    out["resumed"] = run(fsdp, tmp / "resumed")
    out["tp"] = run(tp, tmp / "tp", stop_after=2)
    out["from_hf"] = run(from_hf, tmp / "hf", stop_after=2)
    out["data"] = [r for r in read_metrics(tmp / "straight") if r["kind"] == "data"]
    out["valid"] = [r["loss"] for r in read_metrics(tmp / "straight") if r["kind"] == "valid"]
    return out


@pytest.fixture(scope="module")
def results(files, tmp_path_factory):
    fsdp = sft_job(*overrides(files))
    tp = sft_job(*overrides(files), "parallel=tp", "parallel.tp=2")
    from_hf = sft_job(*overrides(files, files["hf"]))
    tmp = tmp_path_factory.mktemp("runs")
    return run_distributed(two_rank_runs, 2, fsdp, tp, from_hf, str(tmp))


def test_sft_learns_the_answers(results):
    straight = results["straight"]
    steps = sorted(straight)
    assert len(steps) >= 6  # two epochs of the packed rows
    assert straight[steps[-1]] < straight[steps[0]] - 1.0
    assert results["valid"][-1] < results["valid"][0] - 1.0
    (data,) = results["data"]
    assert data["train_samples"] + data["valid_samples"] == 48
    assert data["truncated"] == data["dropped_overlong"] == data["skipped_invalid"] == 0


def test_sft_resumes_exactly(results):
    assert sorted(results["first_part"]) == [1, 2, 3]
    assert results["resumed"] == results["straight"]  # bitwise


def test_sft_on_tensor_parallel_layout_matches_fsdp(results):
    for step in (1, 2):
        assert results["tp"][step] == pytest.approx(results["straight"][step], abs=1e-5)


def test_sft_starts_from_an_hf_folder(results):
    for step in (1, 2):
        assert results["from_hf"][step] == pytest.approx(results["straight"][step], abs=1e-5)


def test_bad_sft_configs_fail_before_any_work(files, tmp_path):
    base = overrides(files)
    cases = {
        "init_from is not set": [*base, "init_from=null"],
        "tokenizer is not set": [*base, "tokenizer=null"],
        "does not exist": [*base, f"data.paths=[{tmp_path / 'none.jsonl'}]"],
        "data.train_on": [*base, "data.train_on=first"],
        "fewer than one global batch": [*base, "train.global_batch_tokens=131072"],
        "attention=flex cannot train on CPU": [*base, "attention=flex"],
    }
    for message, args in cases.items():
        with pytest.raises(ValueError, match=message):
            sft(sft_job(*args), tmp_path / "run")
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_launch_sft_under_torchrun_with_resume(files, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "llama_dist.torchrun",  # torchrun, passing on the trainers' exit codes
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "launch" / "sft.py"),
        *overrides(files),
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
    done = losses(run_dir)
    assert sorted(done)[-1] >= 6 and 3 in done
    assert (run_dir / "samples.txt").read_text().startswith("--- user:")
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert json.loads((last / "model_config.json").read_text())["vocab_size"] == 320
