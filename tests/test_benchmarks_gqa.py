"""benchmarks/gqa.py end to end on a tiny shape: equal parameters, exact KV cache sizes, the
memory budget that stops MHA before MQA, and the written report and plot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from llama_dist.models.config import LlamaConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gqa.py"
DIM, N_LAYERS, N_HEADS, GQA_KV, VOCAB = 64, 2, 8, 2, 256
PROMPT_LEN, NEW_TOKENS = 16, 4
MAX_LEN = PROMPT_LEN + NEW_TOKENS
FP32 = 4


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_gqa", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the file executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def kv_bytes(kv_heads: int, batch_size: int) -> int:
    head_dim = DIM // N_HEADS
    return 2 * N_LAYERS * batch_size * MAX_LEN * kv_heads * head_dim * FP32


@pytest.fixture(scope="module")
def gqa() -> ModuleType:
    return load_script()


@pytest.fixture(scope="module")
def run(gqa, tmp_path_factory):
    out = tmp_path_factory.mktemp("gqa")
    mha = LlamaConfig(dim=DIM, n_layers=N_LAYERS, n_heads=N_HEADS, vocab_size=VOCAB).validate()
    weights = mha.num_params() * FP32
    # Between MHA's need at batch 1 and at batch 4: MHA then fits only the smaller batch.
    budget = weights + (kv_bytes(N_HEADS, 1) + kv_bytes(N_HEADS, 4)) // 2
    argv = [
        *("--dim", str(DIM), "--n-layers", str(N_LAYERS), "--n-heads", str(N_HEADS)),
        *("--vocab-size", str(VOCAB), "--gqa-kv-heads", str(GQA_KV)),
        *("--prompt-len", str(PROMPT_LEN), "--new-tokens", str(NEW_TOKENS)),
        *("--batch-sizes", "1", "4", "--repeats", "1", "--device", "cpu"),
        *("--memory-budget-gib", repr(budget / 2**30)),
        *("--out-md", str(out / "gqa.md"), "--out-png", str(out / "gqa.png")),
    ]
    return gqa.main(argv), out


def test_variants_have_equal_parameters(run):
    report, _ = run
    by_name = {v.name: v for v in report.variants}
    assert [by_name[n].cfg.num_kv_heads for n in ("MHA", "GQA", "MQA")] == [N_HEADS, GQA_KV, 1]
    params = [v.num_params for v in report.variants]
    assert max(params) / min(params) - 1 < 0.01
    # Fewer kv heads, wider FFN.
    assert by_name["MHA"].cfg.hidden_dim < by_name["GQA"].cfg.hidden_dim
    assert by_name["GQA"].cfg.hidden_dim < by_name["MQA"].cfg.hidden_dim


def test_ffn_width_is_the_closest_integer(gqa):
    base = LlamaConfig(dim=DIM, n_layers=N_LAYERS, n_heads=N_HEADS, vocab_size=VOCAB).validate()
    for kv in (GQA_KV, 1):
        width = gqa.equal_param_ffn_dim(base, kv)

        def diff(h: int, kv: int = kv) -> int:
            return abs(
                base.replace(n_kv_heads=kv, ffn_hidden_dim=h).num_params() - base.num_params()
            )

        assert diff(width) <= min(diff(width - 1), diff(width + 1))


def test_kv_cache_bytes_follow_the_formula(run):
    report, _ = run
    heads = {v.name: v.cfg.num_kv_heads for v in report.variants}
    rows = {(r.variant, r.batch_size): r for r in report.rows}
    assert len(rows) == 6
    for (name, batch_size), row in rows.items():
        assert row.kv_cache_bytes == kv_bytes(heads[name], batch_size)
    for batch_size in (1, 4):
        mha, mqa = rows["MHA", batch_size], rows["MQA", batch_size]
        assert mqa.kv_cache_bytes * N_HEADS == mha.kv_cache_bytes


def test_budget_stops_mha_where_mqa_fits(run):
    report, _ = run
    rows = {(r.variant, r.batch_size): r for r in report.rows}
    assert rows["MHA", 1].fits and not rows["MHA", 4].fits
    assert rows["MQA", 4].fits and rows["GQA", 4].fits
    # Over the budget: not run at all.
    assert rows["MHA", 4].tokens_per_s is None and rows["MHA", 4].decode_s is None
    for row in report.rows:
        assert (row.memory_bytes <= report.budget_bytes) == row.fits
        if row.fits:
            assert row.tokens_per_s > 0 and row.ms_per_token > 0 and row.prefill_s > 0
    assert report.largest_batch == {"MHA": 1, "GQA": 4, "MQA": 4}


def test_report_and_plot_are_written(run):
    report, out = run
    markdown = (out / "gqa.md").read_text()
    assert markdown == report.markdown
    assert "| MHA (kv=8) | 4 | OOM |" in markdown
    assert "torch:" in markdown and "command:" in markdown
    assert (out / "gqa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
