"""Smoke test of benchmarks/mfu.py: one training step of the trainer, of the bare model and of
HF on the debug preset, each in its own process, as the benchmark runs them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from llama_dist.models.config import get_preset
from llama_dist.models.flops import flops_per_token

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mfu.py"


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_mfu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the classes are created.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_mfu_benchmark_runs_ours_and_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    bench = load_script(monkeypatch)
    out = tmp_path / "mfu.md"
    seq_len = 64
    report = bench.main(
        [
            "--preset", "debug", "--seq-len", str(seq_len), "--micro-batch", "2",
            "--steps", "1", "--warmup", "0", "--device", "cpu", "--out", str(out),
        ]
    )  # fmt: skip

    rows = {row.setting.impl: row for row in report.rows}
    assert sorted(rows) == ["hf", "ours", "trainer"] and len(report.rows) == 3
    for row in report.rows:
        assert row.error is None, row.error
        assert row.tokens_per_s > 0 and row.step_time_s > 0 and row.peak_mem_gib > 0
    fpt = flops_per_token(get_preset("debug"), seq_len)
    assert report.flops_per_token == fpt
    ours, hf = rows["ours"], rows["hf"]
    assert ours.tflops == pytest.approx(ours.tokens_per_s * fpt / 1e12)
    assert ours.vs_hf == pytest.approx(ours.tokens_per_s / hf.tokens_per_s)
    # Same weights and data: the two implementations compute the same loss.
    assert ours.first_loss == pytest.approx(hf.first_loss, rel=1e-4)
    # The trainer's step (FSDP2, fp32 master weights) starts from the same weights too.
    trainer = rows["trainer"]
    assert trainer.first_loss == pytest.approx(ours.first_loss, rel=1e-4)
    assert trainer.vs_hf == pytest.approx(trainer.tokens_per_s / hf.tokens_per_s)
    # No peak given on CPU: MFU is left out rather than guessed.
    assert ours.mfu is None
    # The measured GEMM rate stands in for a peak.
    gemm = report.env["gemm_flops"]
    assert gemm > 0
    for row in report.rows:
        assert row.of_gemm == pytest.approx(row.tflops * 1e12 / gemm)

    text = out.read_text()
    assert "| ours | 2 | none | off |" in text and "| hf | 2 | none | off |" in text
    assert "| trainer | 2 | none | off |" in text
    assert f"model FLOPs/token {fpt:,}" in text
    # The settings' processes ran with the allocator setting asked for (the default: off).
    assert "transparent huge pages: off, for every implementation alike" in text
    assert f"measured GEMM rate: {gemm / 1e12:.4g} TFLOP/s" in text
