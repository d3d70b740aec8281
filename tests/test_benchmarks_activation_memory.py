"""benchmarks/activation_memory.py end to end in its quick mode: the table it writes, and its
exit status, which fails when a measurement strays from the formulas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_a_table_within_the_formulas(tmp_path):
    out = tmp_path / "activation_memory.md"
    done = subprocess.run(
        [sys.executable, "benchmarks/activation_memory.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| GQA")]
    assert [row.split("|")[5].strip() for row in rows] == ["none", "selective", "full"]
    for row in rows:
        assert abs(float(row.split("|")[8]) - 1) < 0.1, row
