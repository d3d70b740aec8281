"""Shared pieces of the pretraining tests: a synthetic corpus and composed job configs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from llama_dist.config import JobConfig, register_configs, to_job_config
from llama_dist.data.prepare import write_token_dataset
from llama_dist.metrics.logger import read_metrics
from llama_dist.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 2048  # the debug preset's
EOS = 2


def write_corpus(prefix: Path, *, num_docs: int = 96, seed: int = 0) -> Path:
    """Learnable documents: runs counting up (mod 61) by a per-document stride, each ending
    in EOS. Few distinct tokens, so a few steps visibly lower the loss."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        start, stride = int(rng.integers(0, 61)), int(rng.integers(1, 4))
        length = int(rng.integers(20, 120))
        body = (start + stride * np.arange(length)) % 61 + 3
        docs.append([*body.tolist(), EOS])
    write_token_dataset(prefix, docs, vocab_size=VOCAB, eos_id=EOS)
    return prefix


def job(data_prefix: Path, *overrides: str) -> JobConfig:
    """The job `launch/pretrain.py model=debug ...` would run, composed by Hydra."""
    register_configs()
    base = [
        "model=debug",
        f"data.paths=[{data_prefix}]",
        "data.seq_len=32",
        "data.valid_fraction=0.05",
        "train.global_batch_tokens=256",
        "train.micro_batch=2",
        "train.steps=10",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.wandb=false",
        "train.device=cpu",
        "optim.warmup_steps=2",
        "checkpoint.every=100",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=[*base, *overrides])
    return to_job_config(cfg)


def train_losses(run_dir: Path) -> dict[int, float]:
    """The last logged training loss of each step (a restarted run logs some steps twice)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def run(cfg: JobConfig, run_dir: Path, **train_overrides) -> dict[int, float]:
    """pretrain() on a copy of `cfg` (validation fills derived fields in place)."""
    cfg = copy.deepcopy(cfg)
    for key, value in train_overrides.items():
        setattr(cfg.train, key, value)
    pretrain(cfg, run_dir)
    return train_losses(run_dir)


def save_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")
