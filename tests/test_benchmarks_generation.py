"""benchmarks/generation.py --quick end to end: it spawns its own 2 gloo ranks per path, both
paths generate the same tokens, and the report and its machine-readable rows are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "generation.py"
QUICK = dict(ranks=2, prompts_per_rank=2, new_tokens=4)  # what --quick runs


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("generation")
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            *("--out-md", str(out / "generation.md"), "--out-json", str(out / "rows.json")),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return (
        result.stdout,
        (out / "generation.md").read_text(),
        json.loads((out / "rows.json").read_text()),
    )


def test_both_paths_generate_the_same_tokens(report):
    _, markdown, data = report
    rows = data["results"]
    assert set(rows) == {"sharded", "consolidated"}
    assert rows["sharded"]["tokens_digest"] == rows["consolidated"]["tokens_digest"]
    assert "the two paths generated the same tokens" in markdown
    for row in rows.values():
        # Every prompt of every rank generated all its tokens (no eos).
        assert row["new_tokens"] == QUICK["ranks"] * QUICK["prompts_per_rank"] * QUICK["new_tokens"]
        assert row["decode_steps"] == QUICK["new_tokens"] - 1
        assert row["tokens_per_s"] > 0 and row["generate_s"] > 0


def test_consolidation_is_timed_and_its_copy_counted(report):
    _, _, data = report
    rows, meta = data["results"], data["meta"]
    assert rows["sharded"]["consolidate_s"] == 0 and rows["consolidated"]["consolidate_s"] > 0
    full_bytes = meta["num_params"] * 4  # fp32 on CPU
    assert meta["shard_bytes"] == pytest.approx(full_bytes / QUICK["ranks"], rel=0.01)
    # The copy is the whole model on each rank, on top of the shard it was gathered from (the
    # resident set of a process that imported torch is far larger still).
    assert rows["consolidated"]["extra_bytes"] >= full_bytes
    for row in rows.values():
        assert row["peak_bytes"] > row["extra_bytes"] + meta["shard_bytes"]


def test_report_is_printed_and_written(report):
    stdout, markdown, _ = report
    assert markdown in stdout
    assert "| (a) through the FSDP-sharded model |" in markdown
    assert "| (b) consolidated copy (incl. consolidation) |" in markdown
    assert "torch:" in markdown and "command:" in markdown and "2 ranks" in markdown
