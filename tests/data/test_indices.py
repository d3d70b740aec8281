"""Start-up on several ranks: data without a sidecar is never read whole by one rank, the
sample indices are built once by rank 0 and memory-mapped by all, a second job reuses both,
and every rank hears of a failure. Compared against a single-process reference."""

from __future__ import annotations

import hashlib

import numpy as np
import torch.distributed as dist
from test_indexed import SEQ, position_stream, write_dataset

from llama_dist.data import indexed, indices
from llama_dist.data.config import DataConfig
from llama_dist.data.indexed import PretrainData
from llama_dist.testing.distributed import run_distributed

NUM_TOKENS = 2001
STREAM, DOCS = position_stream(NUM_TOKENS, [9, 30, 4, 17])
MAX_ID = int(STREAM.max())
VOCAB = 4096
NUM_SAMPLES = 550  # two and a half epochs of 224 training samples


def config(prefix: str) -> DataConfig:
    return DataConfig(paths=[prefix], seq_len=SEQ, valid_fraction=0.1, seed=3)


def digest(data: PretrainData) -> str:
    samples = np.stack([data.train_sample(g) for g in range(NUM_SAMPLES)])
    return hashlib.sha256(samples.tobytes()).hexdigest()


def error_of(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def startup_worker(no_sidecar: str, with_sidecar: str, cache: str, blocked: str) -> list[dict]:
    """Two preparations of the same data on every rank, counting scans and index builds;
    then failures on one rank. Returns every rank's record."""
    from megatron.core.datasets import gpt_dataset

    scans: list[int] = []
    builds: list[int] = []
    real_scan, real_shuffle = indexed._token_range, gpt_dataset._build_shuffle_index

    def counting_scan(tokens):
        scans.append(len(tokens))
        return real_scan(tokens)

    def counting_shuffle(*args, **kwargs):
        builds.append(1)
        return real_shuffle(*args, **kwargs)

    indexed._token_range = counting_scan
    gpt_dataset._build_shuffle_index = counting_shuffle
    out: dict = {"rank": dist.get_rank()}
    for run in ("first", "second"):
        scans.clear()
        builds.clear()
        data = PretrainData(config(no_sidecar), vocab_size=VOCAB, cache_dir=cache)
        data.prepare(NUM_SAMPLES)
        out[run] = {
            "scans": list(scans),
            "builds": len(builds),
            "epochs": len(data._epochs[0]),
            "mapped": all(
                isinstance(getattr(e.dataset, name), np.memmap)
                for e in data._epochs[0]
                for name in ("document_index", "sample_index", "shuffle_index")
            ),
            "digest": digest(data),
        }
    # The cached range still fails a model whose vocabulary is too small, on every rank.
    small = PretrainData(config(no_sidecar), vocab_size=MAX_ID, cache_dir=cache)
    out["vocab_error"] = error_of(lambda: small.prepare(1))
    # Rank 0 cannot write the indices: every rank raises its error.
    out["write_error"] = error_of(
        lambda: PretrainData(config(with_sidecar), vocab_size=VOCAB, cache_dir=blocked).prepare(1)
    )
    # Rank 1 cannot see what rank 0 wrote (a node-local cache_dir): every rank raises.
    if dist.get_rank() == 1:

        def unseen(self):
            raise FileNotFoundError(f"{self.folder} does not exist")

        indices.EpochIndex.open = unseen
    out["read_error"] = error_of(
        lambda: PretrainData(config(with_sidecar), vocab_size=VOCAB, cache_dir=cache).prepare(1)
    )
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    return gathered


def test_two_ranks_scan_shares_build_once_and_map(tmp_path):
    no_sidecar = str(write_dataset(tmp_path / "mega", DOCS, sidecar=False))
    with_sidecar = str(write_dataset(tmp_path / "ours", DOCS, vocab_size=VOCAB))
    cache = tmp_path / "cache"
    # A file where rank 0 would create the sidecar'd source's cache folder.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    indices.source_folder(blocked, with_sidecar).write_text("not a folder")

    ranks = run_distributed(startup_worker, 2, no_sidecar, with_sidecar, str(cache), str(blocked))
    first = [r["first"] for r in ranks]
    second = [r["second"] for r in ranks]
    # Each rank scanned its half of the .bin, once; the second job scanned nothing.
    assert [f["scans"] for f in first] == [[NUM_TOKENS // 2], [NUM_TOKENS - NUM_TOKENS // 2]]
    assert [s["scans"] for s in second] == [[], []]
    assert (indices.source_folder(cache, no_sidecar) / "token_range.json").is_file()
    # Rank 0 built the three epochs; rank 1 built nothing; nobody rebuilt in the second job.
    assert [f["builds"] for f in first] == [3, 0]
    assert [s["builds"] for s in second] == [0, 0]
    assert all(r["epochs"] == 3 and r["mapped"] for r in first + second)

    # Every rank reads the samples a single process reads (built from scratch elsewhere).
    reference = PretrainData(config(no_sidecar), vocab_size=VOCAB, cache_dir=tmp_path / "ref")
    reference.prepare(NUM_SAMPLES)
    assert {r["digest"] for r in first + second} == {digest(reference)}
    assert reference.sources[0].num_train * 2 < NUM_SAMPLES <= reference.sources[0].num_train * 3

    vocab_errors = {r["vocab_error"] for r in ranks}
    assert len(vocab_errors) == 1
    assert f"holds token id {MAX_ID}, outside the model's vocab_size={MAX_ID}" in next(
        iter(vocab_errors)
    )
    write_errors = {r["write_error"] for r in ranks}
    assert len(write_errors) == 1
    assert "cannot write the sample indices under data.cache_dir=" in next(iter(write_errors))
    read_errors = [r["read_error"] for r in ranks]
    assert read_errors[0].startswith("another rank cannot read the sample indices")
    assert read_errors[1].startswith("rank 1 cannot read the sample indices rank 0 wrote")
