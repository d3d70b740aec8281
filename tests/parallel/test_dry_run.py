"""Dry runs of big layouts with a fake process group, through the command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from llama_dist.models import get_preset

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def dry_run(*args: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "launch/dry_run.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = {}
    for line in out.stdout.splitlines():
        match = re.match(r"(.+?)\s{2,}([\d,]*)\s+([\d.]+)$", line)
        if match:
            rows[match.group(1).strip()] = (match.group(2), float(match.group(3)))
    return rows


@pytest.mark.parametrize(
    "model,world,tp,block_gather_divisor",
    [("70b", 2048, 8, 8), ("7b", 64, 1, 1)],
)
def test_dry_run_per_rank_bytes(model, world, tp, block_gather_divisor):
    rows = dry_run("--model", model, "--world-size", str(world), "--tp", str(tp))
    cfg = get_preset(model)
    count = int(rows["parameters (local)"][0].replace(",", ""))
    even_share = cfg.num_params() / world
    # Rank 0 holds the largest shard: an even share plus FSDP's rounding of dim 0 up.
    assert even_share <= count <= 1.03 * even_share
    assert rows["parameters (local)"][1] == pytest.approx(count * 4 / GIB, abs=1e-3)
    assert rows["gradients"][1] == rows["parameters (local)"][1]
    assert rows["optimizer state (AdamW)"][1] == pytest.approx(2 * count * 4 / GIB, abs=2e-3)
    # The largest all-gather is one block, unsharded over dp, still split over tp, in bf16.
    block = (cfg.num_params() - 2 * cfg.vocab_size * cfg.dim - cfg.dim) / cfg.n_layers
    gather = next(v for k, v in rows.items() if k.startswith("largest all-gather (layers."))
    assert gather[1] == pytest.approx(block / block_gather_divisor * 2 / GIB, rel=1e-3)


def test_dry_run_rejects_a_bad_layout_before_building():
    out = subprocess.run(
        [
            sys.executable,
            "launch/dry_run.py",
            "--model",
            "70b",
            "--world-size",
            "2048",
            "--tp",
            "16",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "parallel.tp=16 does not divide model.n_kv_heads=8" in out.stderr
