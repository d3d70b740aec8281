"""The real entry points under torchrun: end to end on CPU, SIGTERM, SIGKILL + restart, export.

Each torchrun launch costs seconds of start-up, so each test makes as few as it can.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faulty_pretrain import KILL_RANK_ENV, KILL_STEP_ENV
from pretrain_helpers import ROOT, train_losses, write_corpus

from llama_dist.metrics.logger import read_metrics
from llama_dist.testing.distributed import torchrun_command
from llama_dist.tokenizer import train_tokenizer

TORCHRUN = torchrun_command(2)


def common(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "launch/pretrain.py",
        "model=debug",
        f"data.paths=[{data}]",
        "data.seq_len=32",
        "train.global_batch_tokens=256",
        "train.micro_batch=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.wandb=false",
        "optim.warmup_steps=2",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def english(n: int = 3000) -> str:
    words = (
        "the king and queen walk in the garden while a fool sings of love and war "
        "to the lords of the court who laugh and weep by turns at every word"
    ).split()
    return "\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(n))


def paragraphs(text: str, lines: int = 4) -> str:
    rows = text.split("\n")
    return "\n\n".join("\n".join(rows[i : i + lines]) for i in range(0, len(rows), lines))


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """A tokenizer and a dataset made by the real tools (train_tokenizer, prepare_data CLI)."""
    root = tmp_path_factory.mktemp("text")
    # Paragraphs of 4 lines: many documents, so validation holds out whole ones like the rest.
    (root / "a.txt").write_text(paragraphs(english()))
    (root / "b.txt").write_text(paragraphs(english(2000)[::-1]))
    tokenizer = train_tokenizer(
        [root / "a.txt", root / "b.txt"], root / "tok.model", vocab_size=400
    )
    subprocess.run(
        [
            sys.executable,
            "launch/prepare_data.py",
            "--input",
            str(root / "a.txt"),
            str(root / "b.txt"),
            "--out",
            str(root / "corpus"),
            "--tokenizer",
            str(tokenizer),
            "--split",
            "paragraph",
            "--workers",
            "2",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return tokenizer, root / "corpus"


def test_end_to_end_sigterm_checkpoints_then_resume_samples_and_export(text_corpus, tmp_path):
    tokenizer, data = text_corpus
    run_dir = tmp_path / "run"
    args = common(
        data,
        run_dir,
        "model.vocab_size=400",
        "train.steps=60",
        "checkpoint.every=1000",
        "train.eval_every=30",
        f"tokenizer={tokenizer}",
        "sample.max_new_tokens=12",
    )
    proc = subprocess.Popen(
        [*TORCHRUN, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(train_losses(run_dir)) < 3 and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does before killing a job
    output = proc.communicate(timeout=120)[0]
    assert "stopping after step" in output, output
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].startswith("step-"), saved
    stopped_at = int(saved[0].split("-")[1])
    assert 3 <= stopped_at < 60

    # The same command again resumes from that checkpoint and finishes.
    done = subprocess.run([*TORCHRUN, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {run_dir / 'checkpoints' / saved[0]}" in done.stdout + done.stderr
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 61))
    assert losses[60] < losses[1] - 1.0
    valid = {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "valid"}
    assert {0, 30, 60} <= set(valid)  # before training, every 30 steps, and at the end
    assert valid[60] < valid[0] - 1.0
    for name in ("config.yaml", "loss_curve.png", "samples.txt"):
        assert (run_dir / name).stat().st_size > 0, name
    assert "prompt" in (run_dir / "samples.txt").read_text()
    assert "vocab_size: 400" in (run_dir / "config.yaml").read_text()

    # Export the training checkpoint to Hugging Face format and compare logits.
    hf_dir = tmp_path / "hf"
    subprocess.run(
        [
            sys.executable,
            "launch/convert.py",
            "--to-hf",
            str(run_dir / "checkpoints"),
            "--out",
            str(hf_dir),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    transformers = pytest.importorskip("transformers")
    from llama_dist.generate import load_for_generation

    ours, _ = load_for_generation(run_dir / "checkpoints", device=torch.device("cpu"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff < 1e-4


def test_sigkill_restart_resumes_bitwise(tmp_path):
    data = write_corpus(tmp_path / "synthetic")
    straight_dir, restarted_dir = tmp_path / "straight", tmp_path / "restarted"
    args = ["train.steps=10", "checkpoint.every=4"]
    straight = subprocess.run(
        [*TORCHRUN, *common(data, straight_dir, *args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr
    # Rank 1 dies by SIGKILL after step 6; torchrun restarts the group, which resumes from
    # the complete checkpoint at step 4. The fault comes from a test-only wrapper of
    # launch/pretrain.py, tests/train/faulty_pretrain.py.
    env = {**os.environ, KILL_STEP_ENV: "6", KILL_RANK_ENV: "1"}
    faulty = ["tests/train/faulty_pretrain.py", *common(data, restarted_dir, *args)[1:]]
    restarted = subprocess.run(
        [*TORCHRUN[:3], "--max-restarts", "1", *TORCHRUN[3:], *faulty],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    log = restarted.stdout + restarted.stderr
    assert restarted.returncode == 0, log
    assert "Signals.SIGKILL" in log or "exitcode: -9" in log, log
    assert "resumed from" in log and "step-00000004" in log
    assert train_losses(restarted_dir) == train_losses(straight_dir)
    assert sorted(train_losses(restarted_dir)) == list(range(1, 11))
