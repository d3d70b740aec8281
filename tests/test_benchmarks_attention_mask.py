"""benchmarks/attention_mask_memory.py end to end in its --quick mode on CPU: the rows it
measures, the documents it packs, the dense mask's bytes and the written report.

The compiled-FlexAttention row is left out here (its CPU compile alone takes ~30 s); the
committed results run it, and tests/models/test_flex_attention.py compiles the same path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_mask_memory.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_attention_mask_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the file executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script()


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("attention_mask") / "report.md"
    argv = ["--quick", "--device", "cpu", "--variants", "dense", "flex-eager", "--out", str(out)]
    return bench.main(argv), out


def test_document_ids_pack_whole_rows(bench):
    ids = bench.document_ids(2, 300, max_doc=50)
    assert ids.shape == (2, 300)
    for row in ids:
        steps = row.diff()
        assert row[0] == 0 and set(steps.tolist()) <= {0, 1}  # contiguous documents
        lengths = row.bincount()
        assert lengths.max() <= 50 and lengths.min() >= 1


def test_cpu_rows_flex_forward_only(run):
    report, _ = run
    cells = [(r.cell.variant, r.cell.backward) for r in report.results]
    # CPU has no FlexAttention backward: dense both ways, flex forward only.
    assert cells == [("dense", True), ("dense", False), ("flex-eager", False)]
    for r in report.results:
        assert r.cell.seq == 256 and r.peak_bytes > 0 and r.ms > 0
        assert r.num_documents > 1


def test_backward_costs_more_than_forward(run):
    report, _ = run
    peaks = {(r.cell.variant, r.cell.backward): r.peak_bytes for r in report.results}
    assert peaks["dense", True] > peaks["dense", False]


def test_report_is_written(run):
    report, out = run
    markdown = out.read_text()
    assert markdown == report.markdown
    # The dense mask's own size: bsz x seq x seq bool.
    assert "| 256 | " in markdown and "65,536 (0.06 MiB)" in markdown
    assert "| FlexAttention, eager | fwd |" in markdown
    assert "no FlexAttention backward on CPU" in markdown and "torch 2.13" in markdown
