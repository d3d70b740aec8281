"""benchmarks/ppo.py --quick end to end: it spawns its own 2 gloo ranks, runs the PPO loop, and
its table has a row per timed iteration and a mean whose parts add up to the measured total."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "ppo.py"
QUICK = dict(warmup=1, iterations=2, batch_prompts=4, max_new_tokens=4)  # what --quick runs
COLUMNS = [
    "iteration",
    "generate s",
    "score s",
    "train s",
    "(no-grad fwd s)",
    "(updates s)",
    "other s",
    "total s",
    "generate",
    "score",
    "train",
    "other",
    "generated tokens/s",
    "response length",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            *("--out", str(out / "ppo.md"), "--out-json", str(out / "ppo.json")),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, (out / "ppo.md").read_text(), json.loads((out / "ppo.json").read_text())


def table(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| iteration |")]
    assert len(lines) == 1
    block = markdown.split(lines[0], 1)[1].splitlines()[2:]  # after the header and the rule
    rows = []
    for line in block:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [cell.strip() for cell in lines[0].strip("|").split("|")], rows


def test_table_has_a_row_per_timed_iteration_and_a_mean(report):
    stdout, markdown, _ = report
    assert markdown in stdout
    header, rows = table(markdown)
    assert header == COLUMNS
    timed = range(QUICK["warmup"] + 1, QUICK["warmup"] + QUICK["iterations"] + 1)
    assert [r[0] for r in rows] == [*map(str, timed), "**mean**"]
    for row in rows:
        assert len(row) == len(COLUMNS)
        seconds = [float(cell) for cell in row[1:8]]
        shares = [float(cell.rstrip("%")) for cell in row[8:12]]
        generate, score, train, forward, update, other, total = seconds
        # The printed parts add up to the printed total, up to rounding to 0.01 s / 0.1%.
        assert generate + score + train + other == pytest.approx(total, abs=0.03)
        assert forward + update == pytest.approx(train, abs=0.02)
        assert sum(shares) == pytest.approx(100.0, abs=0.3)
        assert float(row[12]) > 0 and 0 < float(row[13]) <= QUICK["max_new_tokens"]
    assert "torch:" in markdown and "command:" in markdown and "2 ranks" in markdown


def test_split_adds_up_to_the_measured_total(report):
    _, _, data = report
    records = {r["step"]: r for r in data["records"]}
    assert sorted(records) == list(range(1, QUICK["warmup"] + QUICK["iterations"] + 1))
    for row in data["rows"]:
        if row["iteration"] == "mean":
            continue
        step = int(row["iteration"])
        # The total is measured apart from the split: between two records' clocks.
        assert row["total_s"] == records[step]["time"] - records[step - 1]["time"]
        parts = row["generate_s"] + row["score_s"] + row["train_s"]
        # Every part is inside the interval, and what they leave out (all-reduces of the
        # record, writing it, the stop check) is small even on a busy machine.
        assert 0 < parts <= row["total_s"] + 0.01
        assert row["total_s"] - parts < max(0.25 * row["total_s"], 0.25), row
        assert 0 < row["forward_s"] < row["train_s"]
        assert row["tokens"] == pytest.approx(
            records[step]["response_length"] * QUICK["batch_prompts"]
        )
