"""benchmarks/data_startup.py: its numpy-written corpus is a valid Megatron dataset, and the
script runs end to end on a tiny corpus and writes its tables."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from llama_dist.data.indexed import TokenSource
from llama_dist.data.prepare import megatron_indexed_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "data_startup.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmarks_data_startup", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_written_corpus_reads_as_megatron_data(tmp_path):
    bench = load_script()
    meta = bench.write_corpus(tmp_path / "c", 500, seed=3)
    dataset = megatron_indexed_dataset().IndexedDataset(str(tmp_path / "c"), mmap=True)
    assert len(dataset) == meta["num_documents"] == 500
    lengths = dataset.sequence_lengths
    assert lengths.min() >= bench.DOC_LENGTHS[0] and lengths.max() <= bench.DOC_LENGTHS[1]
    assert int(lengths.sum()) == meta["num_tokens"]
    for i in (0, 1, 250, 499):
        doc = dataset[i]
        assert doc[-1] == bench.EOS and (doc[:-1] != bench.EOS).all() and doc.dtype == np.uint16
    for prefix, has_meta in ((tmp_path / "c", True), (tmp_path / "c_bare", False)):
        source = TokenSource(str(prefix), vocab_size=bench.VOCAB, seq_len=bench.SEQ_LEN)
        assert (source.meta is not None) == has_meta
        assert source.num_tokens == meta["num_tokens"]


def test_script_writes_both_tables(tmp_path):
    out = tmp_path / "startup.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--docs", "1000", "--ranks", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = out.read_text()
    assert text.count("| 1e+03 | ") == 5  # one row per path
    assert "new, sidecar, warm cache" in text and "## Extrapolated: 2T tokens, 2048 ranks" in text
    assert "old, no sidecar" in text.split("## Extrapolated")[1]
