"""Resuming pretraining under a changed config, and from a damaged latest checkpoint.

The real loop (`pretrain`, what launch/pretrain.py runs) on 2 gloo ranks, several runs per
launch: a run stops at step 4 with checkpoints of steps 2 and 4, then is resumed under changed
configs (refused, allowed, a new lr that must really be used) and from copies whose step 4 is
damaged in each way (refused naming the file and step 2, or resumed from step 2 with
checkpoint.on_damaged=previous). One subprocess runs launch/pretrain.py itself to check the
operator sees one line and exit code 2.
"""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from pretrain_helpers import ROOT, job, run, write_corpus

from llama_dist.lr_schedule import warmup_cosine
from llama_dist.testing.distributed import run_distributed
from llama_dist.train.run_lock import release_run_folders

ENV_KEYS = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def capture_logs() -> list[str]:
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("llama_dist")
    logger.setLevel(logging.INFO)
    logger.addHandler(Collect())
    return messages


def attempt(cfg, run_dir: Path, **overrides) -> str:
    try:
        run(cfg, run_dir, **overrides)
    except ValueError as e:
        return f"ValueError: {e}"
    return "resumed"


def config_change_worker(base, changed, steps, new_lr, allowed, tmp: str) -> dict:
    tmp = Path(tmp)
    run_dir = tmp / "run"
    out: dict = {}
    run(base, run_dir, stop_after=4)
    out["changed"] = attempt(changed, run_dir, stop_after=5)
    out["steps"] = attempt(steps, run_dir, stop_after=5)
    logs = capture_logs()
    out["new_lr"] = attempt(new_lr, run_dir, stop_after=5)
    out["new_lr_logs"] = list(logs)
    out["allowed"] = attempt(allowed, run_dir, stop_after=6)
    return out


DAMAGES = ("truncated_distcp", "metadata", "model_config", "garbled_distcp")


def spoil(folder: Path, how: str) -> None:
    shard = folder / "__1_0.distcp"
    if how == "truncated_distcp":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif how == "metadata":
        (folder / ".metadata").write_bytes((folder / ".metadata").read_bytes()[:200])
    elif how == "model_config":
        (folder / "model_config.json").write_text('{"dim": 128,\n')
    elif how == "garbled_distcp":
        shard.write_bytes(b"\0" * shard.stat().st_size)  # same size: found by the load


def damaged_worker(base, previous, tmp: str) -> dict:
    tmp = Path(tmp)
    original = tmp / "original"
    run(base, original, stop_after=4)
    release_run_folders()  # as when that run's process ends: the copies carry no live lock
    out: dict = {}
    for how in DAMAGES:
        run_dir = tmp / how
        if dist.get_rank() == 0:
            shutil.copytree(original, run_dir)
            spoil(run_dir / "checkpoints" / "step-00000004", how)
        dist.barrier()
        refused = attempt(base, run_dir, stop_after=5)
        logs = capture_logs()
        state = copy.deepcopy(previous)
        resumed = attempt(state, run_dir, stop_after=3)
        out[how] = {
            "refused": refused,
            "resumed": resumed,
            "logs": list(logs),
            "listing": sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
        }
        logging.getLogger("llama_dist").handlers.clear()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "synthetic")


@pytest.fixture(scope="module")
def changes(corpus, tmp_path_factory) -> dict:
    every = "checkpoint.every=2"
    return run_distributed(
        config_change_worker,
        2,
        job(corpus, every),
        job(corpus, every, "data.seq_len=64", "train.global_batch_tokens=512"),
        job(corpus, every, "train.steps=20"),
        job(corpus, every, "optim.lr=1e-3"),
        job(
            corpus,
            every,
            "data.seq_len=64",
            "train.global_batch_tokens=512",
            "checkpoint.allow_changes=[data.seq_len,train.global_batch_tokens]",
        ),
        str(tmp_path_factory.mktemp("changes")),
    )


def test_changed_seq_len_and_global_batch_are_refused_naming_the_keys(changes):
    text = changes["changed"]
    assert text.startswith("ValueError: cannot resume from checkpoint step-00000004 (step 4) in ")
    assert "data.seq_len: 32 -> 64" in text
    assert "train.global_batch_tokens: 256 -> 512" in text
    assert "checkpoint.allow_changes=[data.seq_len,train.global_batch_tokens]" in text
    assert "checkpoint.init_from=" in text


def test_a_schedule_that_moves_the_lr_at_the_resumed_step_is_refused(changes):
    text = changes["steps"]
    assert "train.steps: 10 -> 20 (the learning rate at scheduler step 4 moves from " in text
    assert "checkpoint.allow_changes=[train.steps]" in text


def test_a_new_lr_is_reported_and_used(changes, tmp_path_factory):
    assert changes["new_lr"] == "resumed"
    logs = changes["new_lr_logs"]
    assert any(
        "optim.lr: 0.003 -> 0.001 (applied: the new value replaces the one saved" in m for m in logs
    ), logs
    assert any("initial_lr 0.003 -> 0.001" in m for m in logs), logs
    # Step 5's checkpoint holds the param groups the optimizer stepped with.
    folder = next(Path(tmp_path_factory.getbasetemp()).glob("changes*/run/checkpoints"))
    step5 = folder / "step-00000005"
    stored = dcp.FileSystemReader(step5).read_metadata().state_dict_metadata
    keys = [k for k in stored if k.startswith("optimizer.param_groups.") and k.endswith("lr")]
    assert keys, sorted(stored)[:20]
    values = _load_values(step5, keys)
    expected = 1e-3 * warmup_cosine(5, warmup_steps=2, total_steps=10, min_ratio=0.1)
    for key, value in values.items():
        if key.endswith(".initial_lr"):
            assert value == pytest.approx(1e-3), key
        else:
            assert value == pytest.approx(expected), key


def _load_values(folder: Path, keys: list[str]) -> dict:
    request: dict = {}
    for key in keys:
        node = request
        parts = key.split(".")
        node = request.setdefault(parts[0], {})
        node[".".join(parts[1:])] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(request, checkpoint_id=folder, no_dist=True)
    return {f"optimizer.{k}": v for k, v in request["optimizer"].items()}


def test_an_allowed_change_resumes(changes):
    assert changes["allowed"] == "resumed"


@pytest.fixture(scope="module")
def damaged(corpus, tmp_path_factory) -> dict:
    every = "checkpoint.every=2"
    return run_distributed(
        damaged_worker,
        2,
        job(corpus, every),
        job(corpus, every, "checkpoint.on_damaged=previous"),
        str(tmp_path_factory.mktemp("damaged")),
    )


@pytest.mark.parametrize(
    ("how", "problem"),
    [
        ("truncated_distcp", "__1_0.distcp is truncated: it has "),
        ("metadata", ".metadata cannot be read ("),
        ("model_config", "model_config.json is not valid JSON (JSONDecodeError: "),
        ("garbled_distcp", "reading it failed (rank 0: RuntimeError: __1_0.distcp: "),
    ],
)
def test_damaged_latest_is_named_and_the_previous_offered_then_taken(damaged, how, problem):
    result = damaged[how]
    text = result["refused"]
    assert text.startswith("ValueError: checkpoint step-00000004 (step 4) in "), text
    assert f"is damaged: {problem}" in text, text
    assert (
        "The newest intact earlier checkpoint is step-00000002 (step 2): to resume from it, run "
        "again with checkpoint.on_damaged=previous" in text
    ), text
    # on_damaged=previous: step 4 set aside (kept), resumed from step 2, step 3 saved.
    assert result["resumed"] == "resumed"
    damaged_names = [n for n in result["listing"] if n.startswith("step-00000004.damaged-")]
    assert len(damaged_names) == 1, result["listing"]
    assert "step-00000002" in result["listing"] and "step-00000003" in result["listing"]
    assert any("set aside as step-00000004.damaged-" in m for m in result["logs"]), result["logs"]
    assert any("resumed from" in m and "step-00000002" in m for m in result["logs"])


def test_entry_point_refuses_a_changed_config_in_one_line(corpus, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "launch/pretrain.py",
        "model=debug",
        f"data.paths=[{corpus}]",
        "data.seq_len=32",
        "train.global_batch_tokens=256",
        "train.micro_batch=2",
        "train.steps=4",
        "train.eval_every=0",
        "train.wandb=false",
        "train.device=cpu",
        "optim.warmup_steps=1",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**__import__("os").environ, **ENV_KEYS}
    first = subprocess.run(
        [*args, "train.stop_after=2"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert first.returncode == 3, first.stderr
    changed = subprocess.run(
        [*args, "data.seq_len=64", "train.global_batch_tokens=512"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert changed.returncode == 2, changed.stderr
    assert "pretrain: error: cannot resume from checkpoint step-00000002 (step 2)" in changed.stderr
    assert "data.seq_len: 32 -> 64" in changed.stderr
    assert "Traceback" not in changed.stderr
    # The same config resumes.
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
