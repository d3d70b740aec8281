"""The chat recipe through its real entry points under torchrun, shortened: SFT -> reward model
-> rejection sampling -> PPO on 2 CPU ranks, each stage starting from the previous one's
checkpoint (the CI version of `make chat-demo rlhf-demo`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from chat_helpers import base_checkpoint, dialogs, make_tokenizer, write_jsonl

from llama_dist.data.preference import write_synthetic_preferences
from llama_dist.metrics.logger import read_metrics
from llama_dist.testing.distributed import torchrun_command

ROOT = Path(__file__).resolve().parents[2]


def torchrun(script: str, run_dir: Path, *args: str) -> str:
    cmd = [
        *torchrun_command(2),
        str(ROOT / "launch" / script),
        *args,
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, (script, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout


@pytest.mark.slow
def test_sft_reward_rejection_sampling_ppo_chain(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    base = base_checkpoint(tmp_path / "base")
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": d} for d in dialogs(24)])
    pairs = write_synthetic_preferences(tmp_path / "pairs.jsonl", num_pairs=64)
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": d[-2]["content"]} for d in dialogs(12, seed=1)]
    )
    common = [f"tokenizer={tokenizer}", "train.device=cpu", "train.wandb=false"]

    torchrun(
        "sft.py",
        tmp_path / "sft",
        f"init_from={base}",
        f"data.paths=[{sft_data}]",
        "data.seq_len=128",
        "train.global_batch_tokens=512",
        "train.steps=2",
        "sample.max_new_tokens=4",
        *common,
    )
    sft_ckpt = tmp_path / "sft" / "checkpoints"
    out = torchrun(
        "reward.py",
        tmp_path / "rm",
        f"init_from={sft_ckpt}",
        f"data.paths=[{pairs}]",
        "data.max_len=128",
        "data.valid_fraction=0.25",
        "train.global_batch_pairs=16",
        "train.micro_batch=8",
        "train.steps=2",
        *common,
    )
    assert "Significantly Better" in out
    rm_ckpt = tmp_path / "rm" / "checkpoints"
    out = torchrun(
        "rejection_sampling.py",
        tmp_path / "rs",
        f"policy={sft_ckpt}",
        f"tokenizer={tokenizer}",
        f"prompts=[{prompts}]",
        f"scorer.reward_model={rm_ckpt}",
        "sampling.num_samples=3",
        "sampling.max_new_tokens=6",
        "device=cpu",
        "sft.data.seq_len=128",
        "sft.train.global_batch_tokens=256",
        "sft.train.wandb=false",
        "sft.sample.max_new_tokens=4",
    )
    assert "| k | max (T=1.0) | median (T=1.0) |" in out
    kept = (tmp_path / "rs" / "iter-1" / "kept.jsonl").read_text().splitlines()
    assert len(kept) == 12 and all(
        json.loads(k)["messages"][-1]["role"] == "assistant" for k in kept
    )
    rs_policy = tmp_path / "rs" / "iter-1" / "sft" / "checkpoints"
    torchrun(
        "ppo.py",
        tmp_path / "ppo",
        f"policy={rs_policy}",
        f"tokenizer={tokenizer}",
        f"prompts=[{prompts}]",
        f"scorer.reward_model={rm_ckpt}",
        f"value_from={rm_ckpt}",
        "iterations=2",
        "ppo.batch_prompts=8",
        "ppo.minibatch_prompts=4",
        "ppo.max_new_tokens=6",
        "eval_every=2",
        "valid_fraction=0.25",
        "device=cpu",
        "wandb=false",
    )
    records = read_metrics(tmp_path / "ppo")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert [r["step"] for r in records if r["kind"] == "valid"] == [2]
    assert sorted((tmp_path / "ppo" / "checkpoints").glob("step-*"))
