"""Packed pretraining samples and their loaders: exact token accounting over data-parallel
ranks, shuffles, resumption, blending, document masks, Megatron-written data, the checks
made before training, and the indices built once and memory-mapped (single process here;
tests/data/test_indices.py has the ranks)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_dist.data import indices
from llama_dist.data.config import DataConfig
from llama_dist.data.indexed import (
    PretrainData,
    TrainLoader,
    ValidLoader,
    blend_pattern,
    document_ids_from_tokens,
)
from llama_dist.data.prepare import megatron_indexed_dataset
from llama_dist.models import Llama, LlamaConfig
from llama_dist.models.llama import document_causal_mask

EOS = 2
VOCAB = 1000
OFFSET = 10  # token at stream position p is p + OFFSET, EOS excepted
SEQ = 8


def write_dataset(
    prefix: Path,
    docs: list[list[int]],
    *,
    dtype=np.uint16,
    sidecar: bool = True,
    eos_id: int = EOS,
    vocab_size: int = VOCAB,
) -> Path:
    """A dataset as launch/prepare_data.py writes it: one item per document (+ sidecar)."""
    indexed_dataset = megatron_indexed_dataset()
    builder = indexed_dataset.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_item(torch.tensor(doc, dtype=torch.int64))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    if sidecar:
        tokens = [t for doc in docs for t in doc]
        meta = {
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "bos_id": 1,
            "num_documents": len(docs),
            "num_tokens": len(tokens),
            "max_token_id": max(tokens, default=-1),
        }
        Path(str(prefix) + ".meta.json").write_text(json.dumps(meta))
    return prefix


def position_stream(num_tokens: int, doc_lengths: list[int]) -> tuple[np.ndarray, list[list[int]]]:
    """A stream whose token at position p is p + OFFSET, cut into documents ending in EOS."""
    stream = np.arange(num_tokens, dtype=np.int64) + OFFSET
    docs, start = [], 0
    lengths = iter(doc_lengths * num_tokens)
    while start < num_tokens:
        end = min(start + next(lengths), num_tokens)
        stream[end - 1] = EOS
        docs.append(stream[start:end].tolist())
        start = end
    return stream, docs


def sample_start(sample: np.ndarray) -> int:
    """Stream position of a sample's first token (no two EOS are adjacent in these streams)."""
    j = int(np.flatnonzero(sample != EOS)[0])
    return int(sample[j]) - OFFSET - j


def assert_whole_document_pieces(sample: np.ndarray) -> None:
    """A window of a stream of whole documents: inside a document the positions run on, and
    only an EOS is followed by another document."""
    for a, b in zip(sample[:-1], sample[1:], strict=True):
        assert a == EOS or b in (a + 1, EOS), sample


# Documents of 5, 13, 2, 31, 7 tokens; valid_fraction 0.1 holds out the last whole
# documents with >= 55 tokens (58: positions 484..541, 7 samples), leaving 484 training
# tokens: 60 training samples (483 // 8), exactly 5 steps of 12, and 3 tokens left over.
NUM_TOKENS = 542
DOC_LENGTHS = [5, 13, 2, 31, 7]
TRAIN_TOKENS = 484


@pytest.fixture(scope="module")
def stream_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream")
    stream, docs = position_stream(NUM_TOKENS, DOC_LENGTHS)
    prefix = write_dataset(folder / "s", docs)
    return stream, str(prefix)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One index cache for the module: entries are keyed by data, seed and seq_len."""
    return tmp_path_factory.mktemp("cache")


def make_data(paths, cache: Path, *, prepare: int = 240, **overrides) -> PretrainData:
    """PretrainData over `paths`, prepared for `prepare` samples (4 epochs of stream_data)."""
    cfg = DataConfig(paths=list(paths), seq_len=SEQ, valid_fraction=0.1, seed=7)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    data = PretrainData(cfg, vocab_size=VOCAB, cache_dir=cache)
    if prepare:
        data.prepare(prepare)
    return data


def epoch_inputs(data: PretrainData, epoch: int, num_train: int) -> list[tuple[int, ...]]:
    return [tuple(data.train_sample(g)) for g in range(epoch * num_train, (epoch + 1) * num_train)]


def step_tokens(step: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([micro["tokens"] for micro in step])


def global_steps(data: PretrainData, num_steps: int, *, dp_size: int, state=None):
    """Each step's samples in global order, gathered from every rank's loader."""
    loaders = []
    for rank in range(dp_size):
        loader = TrainLoader(data, global_batch=12, micro_batch=2, dp_rank=rank, dp_size=dp_size)
        if state is not None:
            loader.load_state_dict(state)
        loaders.append(loader)
    steps = []
    for _ in range(num_steps):
        per_rank = [next(loader) for loader in loaders]
        assert {len(s) for s in per_rank} == {12 // (2 * dp_size)}
        steps.append(torch.cat([step_tokens(s) for s in per_rank]))
    return steps, loaders[0].state_dict()


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_one_epoch_uses_every_token_once(stream_data, cache, dp_size):
    stream, prefix = stream_data
    data = make_data([prefix], cache)
    source = data.sources[0]
    assert (source.num_train, source.num_valid, source.train_tokens) == (60, 7, TRAIN_TOKENS)
    assert stream[TRAIN_TOKENS - 1] == EOS  # the hold-out starts with a document
    steps, state = global_steps(data, 5, dp_size=dp_size)
    assert state == {"consumed_samples": 60}

    uses = np.zeros(NUM_TOKENS, dtype=np.int64)
    for samples in steps:
        assert samples.shape == (12, SEQ + 1) and samples.dtype == torch.int64
        for sample in samples.numpy():
            assert_whole_document_pieces(sample)
            for token in sample[:SEQ]:  # the inputs; the labels are shifted by one
                if token != EOS:
                    uses[token - OFFSET] += 1
    # Every input is used at most once, none held out; shuffled documents leave a remainder
    # shorter than a sample somewhere in the epoch, not at a fixed place.
    assert uses.max() == 1 and uses[TRAIN_TOKENS:].sum() == 0
    unused = [p for p in range(TRAIN_TOKENS) if stream[p] != EOS and not uses[p]]
    assert len(unused) < SEQ + 1

    # Validation: the held-out documents in stream order, disjoint from training.
    assert data.num_valid_samples == 7
    valid_starts = [sample_start(data.valid_sample(i)) for i in range(7)]
    assert valid_starts == [TRAIN_TOKENS + i * SEQ for i in range(7)]
    for i in range(7):
        start = TRAIN_TOKENS + i * SEQ
        np.testing.assert_array_equal(data.valid_sample(i), stream[start : start + SEQ + 1])


def test_shuffle_differs_per_epoch_and_is_reproducible(stream_data, cache, tmp_path):
    _, prefix = stream_data
    data = make_data([prefix], cache)
    epochs = [epoch_inputs(data, e, 60) for e in range(3)]
    assert [data.train_index(g)[1:] for g in (0, 59, 60, 179)] == [(0, 0), (0, 59), (1, 0), (2, 59)]
    for epoch in epochs:
        assert len(set(epoch)) == 60  # no sample twice in an epoch
    assert epochs[0] != epochs[1] != epochs[2]
    # Megatron reshuffles the documents every epoch, so the samples themselves differ.
    assert set(epochs[0]) != set(epochs[1])
    # The same from the cache, and from scratch in another folder.
    assert [epoch_inputs(make_data([prefix], cache), e, 60) for e in range(3)] == epochs
    assert [epoch_inputs(make_data([prefix], tmp_path), e, 60) for e in range(3)] == epochs
    assert epoch_inputs(make_data([prefix], cache, seed=8), 0, 60) != epochs[0]


@pytest.mark.parametrize("resume_dp", [1, 2, 3])
def test_resume_sees_the_uninterrupted_samples(stream_data, cache, resume_dp):
    _, prefix = stream_data
    # 8 steps of 12 cross the 60-sample epoch boundary.
    reference, _ = global_steps(make_data([prefix], cache), 8, dp_size=1)
    first, state = global_steps(make_data([prefix], cache), 3, dp_size=2)
    assert state == {"consumed_samples": 36}
    rest, _ = global_steps(make_data([prefix], cache), 5, dp_size=resume_dp, state=state)
    for got, want in zip(first + rest, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_longer_run_keeps_the_order_of_a_shorter_one(stream_data, tmp_path):
    # train.steps changed on resume: an epoch's indices do not depend on the run's length.
    _, prefix = stream_data
    short = make_data([prefix], tmp_path, prepare=70)
    assert [len(e) for e in short._epochs] == [2]
    long = make_data([prefix], tmp_path, prepare=300)
    assert [len(e) for e in long._epochs] == [5]
    for g in range(70):
        np.testing.assert_array_equal(long.train_sample(g), short.train_sample(g))


def test_indices_are_memory_mapped_and_never_built_in_the_loop(stream_data, tmp_path, monkeypatch):
    _, prefix = stream_data
    data = make_data([prefix], tmp_path, prepare=180)  # 3 epochs
    folders = sorted(p.name for p in indices.source_folder(tmp_path, prefix).iterdir())
    assert [f.split("-seq")[0] for f in folders] == [f"epoch-{e:05d}" for e in range(3)]
    source = data.sources[0]
    assert all(f"-seq{data.seq_len}-train{source.train_sequences}-seed" in f for f in folders)
    for epoch in data._epochs[0]:
        for name in ("document_index", "sample_index", "shuffle_index"):
            assert isinstance(getattr(epoch.dataset, name), np.memmap), name

    # From here on nothing may be built: every step, epochs 2 and 3 included, reads the maps.
    from megatron.core.datasets import gpt_dataset

    def no_build(*args, **kwargs):
        raise AssertionError("an index was built after prepare()")

    monkeypatch.setattr(gpt_dataset, "_build_document_index", no_build)
    monkeypatch.setattr(gpt_dataset, "_build_shuffle_index", no_build)
    steps, _ = global_steps(data, 15, dp_size=2)  # 180 samples: 3 epochs
    assert len(steps) == 15
    with pytest.raises(IndexError, match=r"epoch 3 of .*prepared \(for 180 samples\).*> 180"):
        data.train_sample(180)
    # A second job on the same cache maps what the first built.
    again = make_data([prefix], tmp_path, prepare=180)
    np.testing.assert_array_equal(again.train_sample(179), data.train_sample(179))


def test_blend_proportions_and_exact_counts(tmp_path):
    paths = []
    for i, num_tokens in enumerate([400, 900, 250]):
        _, docs = position_stream(num_tokens, [11, 3, 25])
        paths.append(str(write_dataset(tmp_path / f"s{i}", docs)))
    weights = [0.5, 0.3, 0.2]
    data = make_data(paths, tmp_path / "cache", prepare=600, weights=weights, valid_fraction=0.0)
    period = len(data.pattern)
    num_samples = 3 * period + 1234

    drawn = [0, 0, 0]
    for g in range(num_samples):
        source, draw = data.locate(g)
        assert draw == drawn[source]  # each source's draws are consecutive: none skipped
        drawn[source] += 1
    assert drawn == data.samples_drawn(num_samples)
    for count, weight in zip(drawn, weights, strict=True):
        assert abs(count / num_samples - weight) <= 1 / period + 1 / num_samples
    # Whole patterns hold the apportioned counts exactly.
    assert data.samples_drawn(2 * period) == [2 * round(w * period) for w in weights]
    # Blended samples are their sources' samples, epoch by epoch.
    for g in (0, 1, 2, 599):
        source, epoch, position = data.train_index(g)
        assert epoch * data.sources[source].num_train + position == data.locate(g)[1]
        np.testing.assert_array_equal(
            data.train_sample(g), data._epochs[source][epoch].sample(position)
        )
    # Over a long run every source is read through whole epochs, at its own pace.
    epochs = data.epochs(num_samples)
    assert epochs == [d / s.num_train for d, s in zip(drawn, data.sources, strict=True)]


def test_blend_defaults_and_tiny_weights(tmp_path):
    paths = []
    for i, num_tokens in enumerate([300, 900]):
        _, docs = position_stream(num_tokens, [9])
        paths.append(str(write_dataset(tmp_path / f"s{i}", docs)))
    data = make_data(paths, tmp_path / "cache", prepare=0, valid_fraction=0.0)
    sizes = np.array([s.num_train for s in data.sources])
    np.testing.assert_allclose(data.weights, sizes / sizes.sum())

    pattern, draws = blend_pattern(np.array([1.0, 1e-6, 0.0]), 1000)
    assert np.bincount(pattern, minlength=3).tolist() == [1000, 1, 0]
    assert draws[pattern == 0].tolist() == list(range(1000))


def test_document_ids_and_positions():
    inputs = torch.tensor([[5, 2, 7, 8, 2, 2, 9], [2, 4, 4, 4, 4, 2, 3]])
    document_ids, position_ids = document_ids_from_tokens(inputs, eos_id=2)
    assert document_ids.tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 2]]
    assert position_ids.tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 0]]
    assert document_ids.dtype == position_ids.dtype == torch.int64

    mask = document_causal_mask(document_ids)[0, 0]
    assert mask[3].tolist() == [False, False, True, True, False, False, False]
    assert mask[4].tolist() == [False, False, True, True, True, False, False]
    assert mask[6].tolist() == [False] * 6 + [True]


def test_document_mask_batches_equal_separate_documents(tmp_path):
    # Documents of 5, 3 and 6 tokens, twice: a sample of 14 packs pieces of three or more.
    docs = [[11, 12, 13, 14, EOS], [21, 22, EOS], [31, 32, 33, 34, 35, EOS]]
    prefix = write_dataset(tmp_path / "docs", docs + docs)
    data = make_data(
        [prefix], tmp_path, prepare=1, seq_len=14, valid_fraction=0.0, document_mask=True
    )
    loader = TrainLoader(data, global_batch=1, micro_batch=1, dp_rank=0, dp_size=1)
    (batch,) = next(loader)
    assert set(batch) == {"tokens", "document_ids", "position_ids"}
    inputs = batch["tokens"][:, :-1]
    assert inputs.shape == batch["document_ids"].shape == batch["position_ids"].shape == (1, 14)
    row = inputs[0].tolist()
    ends = [j + 1 for j, t in enumerate(row) if t == EOS and j + 1 < len(row)]
    starts = [0, *ends, len(row)]
    assert len(starts) >= 4  # at least three documents (or pieces) share the row
    spans = list(zip(starts[:-1], starts[1:], strict=True))
    expected_ids = [d for d, (a, b) in enumerate(spans) for _ in range(a, b)]
    assert batch["document_ids"].tolist() == [expected_ids]
    expected_positions = [p for a, b in spans for p in range(b - a)]
    assert batch["position_ids"].tolist() == [expected_positions]

    cfg = LlamaConfig(
        dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32
    ).validate()
    model = Llama(cfg)
    model.init_weights(0)
    with torch.no_grad():
        packed = model(
            inputs,
            position_ids=batch["position_ids"],
            document_ids=batch["document_ids"],
        )
        for a, b in spans:
            alone = model(inputs[:, a:b])
            torch.testing.assert_close(packed[:, a:b], alone, atol=1e-5, rtol=1e-5)
        # Without the mask, later documents see earlier ones.
        leaky = model(inputs, position_ids=batch["position_ids"])
        a, b = starts[1], starts[2]
        assert not torch.allclose(leaky[:, a:b], model(inputs[:, a:b]), atol=1e-3)


def test_megatron_written_data_without_sidecar(tmp_path):
    # Megatron's preprocess_data.py --append-eod: add_document with one length per sentence,
    # EOS appended to the last sentence, dtype from DType.optimal_dtype, no sidecar.
    indexed_dataset = megatron_indexed_dataset()
    rng = np.random.default_rng(0)
    docs = []
    prefix = str(tmp_path / "mega_text_document")
    builder = indexed_dataset.IndexedDatasetBuilder(
        prefix + ".bin", dtype=indexed_dataset.DType.optimal_dtype(VOCAB)
    )
    for _ in range(20):
        sentences = [rng.integers(3, VOCAB, size=rng.integers(1, 9)).tolist() for _ in range(3)]
        sentences[-1].append(EOS)
        builder.add_document([t for s in sentences for t in s], [len(s) for s in sentences])
        docs.append([t for s in sentences for t in s])
    builder.finalize(prefix + ".idx")
    stream = np.array([t for doc in docs for t in doc])

    data = make_data([prefix], tmp_path / "cache", prepare=0, valid_fraction=0.1)
    source = data.sources[0]
    assert source.meta is None and data.eos_id == EOS
    assert (source.num_documents, source.num_tokens) == (20, len(stream))
    # The hold-out is whole documents (not sentences): it starts after an EOS.
    assert stream[source.train_tokens - 1] == EOS and source.train_sequences % 3 == 0
    data.prepare(source.num_train)
    # Megatron's GPTDataset shuffles sequences (here sentences): an epoch still reads every
    # training token once, but for the remainder.
    inputs = Counter(t for g in range(source.num_train) for t in data.train_sample(g)[:SEQ])
    assert inputs <= Counter(stream[: source.train_tokens].tolist())
    assert sum(inputs.values()) == source.num_train * SEQ
    for i in range(source.num_valid):
        start = source.train_tokens + i * SEQ
        np.testing.assert_array_equal(data.valid_sample(i), stream[start : start + SEQ + 1])
    # Without a sidecar the vocabulary check reads the token range: scanned in prepare().
    cfg = DataConfig(paths=[prefix], seq_len=SEQ)
    small = PretrainData(cfg, vocab_size=int(stream.max()), cache_dir=tmp_path / "other")
    with pytest.raises(ValueError, match=f"holds token id {stream.max()}, outside"):
        small.prepare(1)
    # Explicit eos_id for data without a sidecar.
    cfg = DataConfig(paths=[prefix], seq_len=SEQ, eos_id=0)
    assert PretrainData(cfg, vocab_size=VOCAB).eos_id == 0


def test_valid_loader_covers_each_sample_once(stream_data, cache):
    stream, prefix = stream_data
    data = make_data([prefix], cache, prepare=0)  # 7 validation samples
    seen = []
    lengths = set()
    for rank in range(2):
        loader = ValidLoader(data, micro_batch=2, dp_rank=rank, dp_size=2)
        lengths.add(len(loader))
        batches = list(loader)
        assert len(batches) == len(loader) == 2  # ceil(7 / 4), on every rank
        for batch in batches:
            assert batch["sample_mask"].dtype == torch.bool
            for row, real in zip(batch["tokens"].numpy(), batch["sample_mask"], strict=True):
                if real:
                    seen.append(sample_start(row))
    assert sorted(seen) == [TRAIN_TOKENS + i * SEQ for i in range(7)]
    subset = ValidLoader(data, micro_batch=2, dp_rank=0, dp_size=1, max_samples=3)
    assert subset.indices.tolist() == [0, 1, 2] and len(subset) == 2


def test_source_errors(tmp_path):
    _, docs = position_stream(100, [7])
    write_dataset(tmp_path / "ok", docs)

    def make_data(paths, **overrides):
        return globals()["make_data"](paths, tmp_path / "cache", prepare=1, **overrides)

    with pytest.raises(
        ValueError, match=r"missing.bin', '.*missing.idx'\] not found.*prepare_data"
    ):
        make_data([str(tmp_path / "missing")])

    truncated = write_dataset(tmp_path / "truncated", docs)
    bin_path = Path(str(truncated) + ".bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-6])
    with pytest.raises(ValueError, match="has 194 bytes.*100 uint16 tokens.*truncated"):
        make_data([str(truncated)])

    garbage = write_dataset(tmp_path / "garbage", docs)
    Path(str(garbage) + ".idx").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="garbage.idx is not a Megatron indexed dataset index"):
        make_data([str(garbage)])

    big = [*docs[:-1], [*docs[-1][:-1], VOCAB + 5, EOS]]
    with pytest.raises(ValueError, match=f"token id {VOCAB + 5}, outside the model's vocab_size"):
        make_data([str(write_dataset(tmp_path / "big", big))])
    with pytest.raises(ValueError, match=f"token id {VOCAB + 5}, outside"):
        make_data([str(write_dataset(tmp_path / "big_nometa", big, sidecar=False))])

    with pytest.raises(ValueError, match="holds no tokens"):
        make_data([str(write_dataset(tmp_path / "empty", []))])

    short = write_dataset(tmp_path / "short", [[11, 12, 13, EOS]])
    with pytest.raises(ValueError, match=r"4 tokens, fewer than one sample of seq_len \+ 1 = 9"):
        make_data([str(short)])
    one_sample = write_dataset(tmp_path / "one", [list(range(11, 20))])
    with pytest.raises(ValueError, match="would take all of them.*valid_fraction=0"):
        make_data([str(one_sample)])
    # A hold-out of whole documents can leave too little to train on.
    two = write_dataset(tmp_path / "two", [[11, 12, EOS], list(range(11, 30))])
    with pytest.raises(ValueError, match="keeps 3 tokens for training.*valid_fraction=0"):
        make_data([str(two)])
    assert make_data([str(one_sample)], valid_fraction=0.0).sources[0].num_train == 1

    other_eos = write_dataset(tmp_path / "other_eos", docs, eos_id=3)
    with pytest.raises(ValueError, match=r"different eos ids \[2, 3\]"):
        make_data([str(tmp_path / "ok"), str(other_eos)])
    with pytest.raises(ValueError, match="data.eos_id=5, but the datasets were tokenized"):
        make_data([str(tmp_path / "ok")], eos_id=5)


def test_loader_and_config_errors(stream_data, cache, tmp_path):
    _, prefix = stream_data
    data = make_data([prefix], cache, prepare=0)
    with pytest.raises(ValueError, match=r"global_batch=10 .* micro_batch=2 x dp_size=3 = 6"):
        TrainLoader(data, global_batch=10, micro_batch=2, dp_rank=0, dp_size=3)
    with pytest.raises(ValueError, match=r"dp_rank=3 must be in \[0, dp_size=3\)"):
        TrainLoader(data, global_batch=12, micro_batch=2, dp_rank=3, dp_size=3)

    bad = {
        "paths": ([], "data.paths is empty"),
        "weights": ([1.0, 2.0], "2 entries for 1 data.paths"),
        "seq_len": (1, "data.seq_len=1 must be an integer >= 2"),
        "cache_dir": (" ", "data.cache_dir is empty"),
        "build_timeout_s": (0.0, r"data.build_timeout_s=0.0 must be > 0"),
        "seed": (-1, "data.seed=-1 must be an integer >= 0"),
        "valid_fraction": (0.5, r"data.valid_fraction=0.5 must be in \[0, 0.5\)"),
    }
    for name, (value, message) in bad.items():
        cfg = DataConfig(paths=[prefix])
        setattr(cfg, name, value)
        with pytest.raises(ValueError, match=message):
            cfg.validate()
    with pytest.raises(ValueError, match="must all be >= 0"):
        DataConfig(paths=[prefix, prefix], weights=[1.0, -1.0]).validate()
    with pytest.raises(ValueError, match="all zero"):
        DataConfig(paths=[prefix], weights=[0.0]).validate()

    # The cache folder: checked before launch, required to prepare.
    (tmp_path / "a_file").write_text("")
    cfg = DataConfig(paths=[prefix], seq_len=SEQ)
    with pytest.raises(ValueError, match=r"data.cache_dir=.*a_file/cache cannot be written"):
        PretrainData(cfg, vocab_size=VOCAB, cache_dir=tmp_path / "a_file" / "cache")
    with pytest.raises(ValueError, match="set data.cache_dir"):
        PretrainData(cfg, vocab_size=VOCAB).prepare(1)
    assert cfg.cache_folder("runs/x") == Path("runs/x/data_cache")


def test_prefetching_loader_hands_out_the_same_steps_and_resumes_exactly(stream_data, cache):
    _, prefix = stream_data
    data = make_data([prefix], cache)
    kw = dict(global_batch=12, micro_batch=2, dp_rank=1, dp_size=3)
    plain = TrainLoader(data, **kw)
    ahead = TrainLoader(data, **kw, prefetch=True)
    try:
        for _ in range(4):
            assert torch.equal(step_tokens(next(ahead)), step_tokens(next(plain)))
        # Steps 2..4 came from the background thread; the position counts handed-out steps.
        assert ahead._prefetcher.hits == 3
        assert ahead.state_dict() == plain.state_dict() == {"consumed_samples": 48}
        # A resume to another position drops the step prefetched for the old one.
        ahead.load_state_dict({"consumed_samples": 12})
        plain.load_state_dict({"consumed_samples": 12})
        assert torch.equal(step_tokens(next(ahead)), step_tokens(next(plain)))
        assert ahead._prefetcher.hits == 3
        assert torch.equal(step_tokens(next(ahead)), step_tokens(next(plain)))
        assert ahead._prefetcher.hits == 4
    finally:
        ahead.close()
