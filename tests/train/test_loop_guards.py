"""The loop's guards and side channels: non-finite steps, wandb offline logging."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from pretrain_helpers import job, train_losses, write_corpus

from llama_dist.metrics.logger import read_metrics
from llama_dist.testing.distributed import run_distributed
from llama_dist.train.pretrain import pretrain


def diverging_worker(cfg, tmp: str) -> str:
    try:
        pretrain(copy.deepcopy(cfg), Path(tmp) / "diverge")
    except RuntimeError as e:
        return str(e)
    return "no error"


def wandb_worker(cfg, tmp: str) -> dict:
    run_dir = Path(tmp) / "wandb-run"
    first = copy.deepcopy(cfg)
    first.train.stop_after = 2  # stops with a checkpoint, as a preempted job would
    pretrain(first, run_dir)
    pretrain(copy.deepcopy(cfg), run_dir)  # the restarted job resumes and finishes
    return {
        "losses": train_losses(run_dir),
        "wandb_files": sorted(
            str(p.relative_to(run_dir)) for p in (run_dir / "wandb").glob("offline-run-*/*.wandb")
        ),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "synthetic")


def test_non_finite_steps_are_skipped_then_abort(corpus, tmp_path):
    # An absurd learning rate overflows the weights after the first update: every later
    # loss is non-finite, each such step is skipped, and the run stops after 3 in a row.
    cfg = job(corpus, "optim.lr=1e30", "train.max_nonfinite_steps=3", "train.steps=20")
    message = run_distributed(diverging_worker, 1, cfg, str(tmp_path))
    assert "3 steps in a row had a non-finite loss or gradient norm (step 4)" in message
    records = read_metrics(tmp_path / "diverge")
    skipped = [r["skipped_steps"] for r in records if r["kind"] == "train"]
    assert skipped[:3] == [0, 1, 2]  # logged steps 1-3; step 4 raised before logging


def test_wandb_logs_offline_without_login(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login, and wandb's cache here
    cfg = job(corpus, "train.wandb=true", "train.steps=3")
    out = run_distributed(wandb_worker, 1, cfg, str(tmp_path))
    assert sorted(out["losses"]) == [1, 2, 3]
    # Two processes, one wandb run: offline-run-<time>-<id>/run-<id>.wandb with the same id.
    assert len(out["wandb_files"]) == 2, out
    ids = {name.rsplit("-", 1)[-1].removesuffix(".wandb") for name in out["wandb_files"]}
    assert len(ids) == 1, out
