"""Packed pretraining samples from Megatron indexed datasets, and the loaders that batch them.

A dataset (`PREFIX.bin` + `PREFIX.idx`) is a stream of documents, each ending with EOS. The
last whole documents holding `valid_fraction` of its tokens (and at least one sample) are held
out for validation, read in stream order as windows of seq_len + 1 tokens. The training
documents are read by epochs: each epoch is one Megatron `GPTDataset` (its documents shuffled,
the shuffled stream cut into windows of seq_len + 1 whose first seq_len tokens are the inputs
and last seq_len the labels, the windows shuffled), so an epoch uses every training token as
an input exactly once, except a remainder shorter than a sample, and pads nothing. Sources are
interleaved by a fixed, repeating blend pattern.

Start-up cost does not grow with the corpus on any rank but one, once: `PretrainData()` does
only the cheap checks (files, sizes, the sidecar's vocabulary), before any process group
exists; `PretrainData.prepare()`, once the group exists, has rank 0 build the epochs' indices
into `data.cache_dir` (`llama_dist.data.indices`) and every rank memory-map them. Data without
a `PREFIX.meta.json` sidecar (e.g. written by Megatron's own `preprocess_data.py
--append-eod`) has its token range scanned once, each rank a 1/world share, and cached.

Every training sample is a pure function of its global index g, so a run resumes anywhere,
at any data-parallel size, from one integer (`consumed_samples`); the indices of an epoch do
not depend on how many steps the run takes.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama_dist.data import indices
from llama_dist.data.config import DataConfig
from llama_dist.data.prepare import megatron_indexed_dataset, read_meta

DEFAULT_EOS_ID = 2  # Llama's </s>, for data without a sidecar
# Slots in one repetition of the blend pattern: mixing proportions are exact to 1/this.
BLEND_PATTERN_LEN = 10_000
# First bytes of every Megatron .idx file.
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
# Tokens per chunk when data without a sidecar is scanned for its largest id (64 MiB of int32).
_SCAN_CHUNK = 1 << 24
# Megatron's document index is int32.
_MAX_SEQUENCES = np.iinfo(np.int32).max

log = logging.getLogger(__name__)


class TokenSource:
    """One dataset prefix: a memory-mapped token stream split into training documents and a
    held-out tail of validation samples.

    Every check that would otherwise fail mid-run happens here, as a ValueError, reading only
    the .idx header, a few of its entries and the sidecar: missing or truncated files, token
    ids outside the model's vocabulary (when a sidecar records them; `PretrainData.prepare`
    checks data without one), too little data for a sample.
    """

    def __init__(
        self,
        prefix: str,
        *,
        vocab_size: int,
        seq_len: int,
        valid_fraction: float = 0.0,
    ) -> None:
        self.prefix = str(prefix)
        bin_path, idx_path = Path(self.prefix + ".bin"), Path(self.prefix + ".idx")
        missing = [str(p) for p in (bin_path, idx_path) if not p.is_file()]
        if missing:
            raise ValueError(
                f"dataset {self.prefix!r} is incomplete: {missing} not found (a dataset is "
                f"{bin_path.name} and {idx_path.name}); write it with python "
                f"launch/prepare_data.py --input CORPUS --out {self.prefix} "
                "--tokenizer tokenizer.model"
            )
        self.meta: dict[str, Any] | None = read_meta(self.prefix)
        self._index = _read_index(self.prefix)
        self.dtype, self.num_documents, self.num_tokens = (
            self._index.dtype,
            self._index.num_documents,
            self._index.num_tokens,
        )

        num_bytes = bin_path.stat().st_size
        if num_bytes != self.num_tokens * self.dtype.itemsize:
            raise ValueError(
                f"{str(bin_path)!r} has {num_bytes} bytes, but {idx_path.name} describes "
                f"{self.num_tokens} {self.dtype.name} tokens "
                f"({self.num_tokens * self.dtype.itemsize} bytes): the .bin is truncated or "
                "belongs to another index; prepare the dataset again"
            )
        if self.num_tokens == 0:
            raise ValueError(
                f"dataset {self.prefix!r} holds no tokens ({self.num_documents} documents); "
                "prepare it from a non-empty corpus or drop it from data.paths"
            )
        if self._index.num_sequences > _MAX_SEQUENCES:
            raise ValueError(
                f"dataset {self.prefix!r} holds {self._index.num_sequences} sequences, more "
                f"than Megatron's int32 document index takes ({_MAX_SEQUENCES}); split the "
                "corpus into several datasets and list them all in data.paths"
            )
        if self.meta is not None and self.meta["num_tokens"] != self.num_tokens:
            raise ValueError(
                f"{self.prefix}.meta.json describes {self.meta['num_tokens']} tokens but the "
                f"index {self.num_tokens}: the sidecar belongs to another preparation; delete "
                "it or prepare the dataset again"
            )
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        self.vocab_size = vocab_size
        if self.meta is not None:
            self.check_token_range(0, int(self.meta["max_token_id"]))

        if self.num_tokens < seq_len + 1:
            raise ValueError(
                f"dataset {self.prefix!r} has {self.num_tokens} tokens, fewer than one sample "
                f"of seq_len + 1 = {seq_len + 1}; lower data.seq_len or give it more text"
            )
        self.seq_len = seq_len
        self.train_documents = self._training_documents(valid_fraction)
        # Training: the sequences of the first train_documents documents, the tokens before
        # the first held-out document.
        self.train_sequences = self._index.first_sequence(self.train_documents)
        self.train_tokens = self._index.document_start(self.train_documents)
        # Consecutive samples share one token (the last label of one is the first input of
        # the next), hence the - 1, in Megatron's sample count as here.
        self.num_train = (self.train_tokens - 1) // seq_len
        self.num_valid = max(0, (self.num_tokens - self.train_tokens - 1) // seq_len)
        if self.num_train < 1:
            raise ValueError(
                f"dataset {self.prefix!r} keeps {self.train_tokens} tokens for training after "
                f"holding out data.valid_fraction={valid_fraction} as whole documents, fewer "
                f"than one sample of seq_len + 1 = {seq_len + 1}; give it more text, lower "
                "data.seq_len, or set data.valid_fraction=0"
            )

    def _training_documents(self, valid_fraction: float) -> int:
        """How many leading documents are trained on: the rest, the validation hold-out, are
        the fewest last documents with at least `valid_fraction` of the tokens and one sample
        (none when valid_fraction=0). Whole documents, so no text is on both sides."""
        if valid_fraction == 0:
            return self.num_documents
        # Rounded to absorb float error (0.07 * 100 is 7.000000000000001), then up.
        wanted = max(math.ceil(round(self.num_tokens * valid_fraction, 6)), self.seq_len + 1)
        # Binary search over the documents' start offsets: O(log documents) reads of the .idx.
        after = bisect.bisect_right(
            range(self.num_documents + 1),
            self.num_tokens - wanted,
            key=self._index.document_start,
        )
        if after <= 1:
            raise ValueError(
                f"dataset {self.prefix!r} has {self.num_tokens} tokens in "
                f"{self.num_documents} document(s): holding out whole documents with "
                f"data.valid_fraction={valid_fraction} of the tokens (and at least one sample "
                f"of seq_len + 1 = {self.seq_len + 1}) would take all of them; give it more "
                "documents, lower data.seq_len, or set data.valid_fraction=0"
            )
        return after - 1

    @property
    def eos_id(self) -> int | None:
        """The EOS id recorded in the sidecar; None for data without one."""
        return None if self.meta is None else int(self.meta["eos_id"])

    def check_token_range(self, min_token_id: int, max_token_id: int) -> None:
        if min_token_id < 0:
            raise ValueError(
                f"dataset {self.prefix!r} holds a negative token id {min_token_id}; it is "
                "not token data, prepare it again"
            )
        if max_token_id >= self.vocab_size:
            tokenized_with = (
                f" (its tokenizer has {self.meta['vocab_size']} pieces)" if self.meta else ""
            )
            raise ValueError(
                f"dataset {self.prefix!r} holds token id {max_token_id}, outside the model's "
                f"vocab_size={self.vocab_size}{tokenized_with}; tokenize the data with the "
                "model's tokenizer, or raise model.vocab_size"
            )

    def valid_sample(self, i: int) -> np.ndarray:
        """Held-out sample i (0 <= i < num_valid), in stream order: seq_len + 1 int64 tokens."""
        assert 0 <= i < self.num_valid, f"validation sample {i} outside [0, {self.num_valid})"
        start = self.train_tokens + i * self.seq_len
        return np.array(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"TokenSource({self.prefix!r}, {self.num_tokens} tokens, "
            f"{self.num_train} train + {self.num_valid} valid samples)"
        )


class _Index:
    """The parts of a Megatron .idx that the checks read, memory-mapped (megatron-core's
    reader): dtype, counts, and document starts looked up one at a time."""

    def __init__(self, dataset: Any) -> None:
        self._dataset = dataset  # keeps the mapping open
        self.dtype = np.dtype(dataset.index.dtype)
        self._lengths = dataset.sequence_lengths
        self._pointers = dataset.index.sequence_pointers
        self._documents = dataset.document_indices
        self.num_sequences = len(self._lengths)
        self.num_documents = len(self._documents) - 1
        # IndexedDatasetBuilder writes sequences back to back from byte 0 (their pointers are
        # the running sum of lengths), so the stream ends where the last sequence does.
        self.num_tokens = (
            0
            if self.num_sequences == 0
            else int(self._pointers[-1]) // self.dtype.itemsize + int(self._lengths[-1])
        )

    def first_sequence(self, document: int) -> int:
        return int(self._documents[document])

    def document_start(self, document: int) -> int:
        """Stream offset of the document's first token (num_tokens past the last one)."""
        sequence = self.first_sequence(document)
        if sequence == self.num_sequences:
            return self.num_tokens
        return int(self._pointers[sequence]) // self.dtype.itemsize


def _read_index(prefix: str) -> _Index:
    """PREFIX.idx, read by megatron-core."""
    problem = f"{prefix}.idx is not a Megatron indexed dataset index"
    fix = "prepare the dataset again with launch/prepare_data.py"
    # Checked here because IndexedDataset, failing on a foreign file, also fails in __del__.
    with open(prefix + ".idx", "rb") as f:
        if f.read(len(_INDEX_MAGIC)) != _INDEX_MAGIC:
            raise ValueError(f"{problem} (it does not start with {_INDEX_MAGIC!r}); {fix}")
    indexed_dataset = megatron_indexed_dataset()
    try:
        # mmap=False opens only the index; the .bin is mapped by the caller as one array.
        dataset = indexed_dataset.IndexedDataset(prefix, mmap=False)
    except (AssertionError, ValueError, struct.error) as e:
        raise ValueError(f"{problem} ({e!r}); {fix}") from e
    return _Index(dataset)


def _token_range(tokens: np.ndarray) -> tuple[int, int]:
    """Smallest and largest token id, a chunk at a time so a large .bin is never all in memory."""
    low, high = None, None
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = tokens[start : start + _SCAN_CHUNK]
        chunk_low, chunk_high = int(chunk.min()), int(chunk.max())
        low = chunk_low if low is None else min(low, chunk_low)
        high = chunk_high if high is None else max(high, chunk_high)
    assert low is not None and high is not None, "scanned an empty token stream"
    return low, high


def apportion(shares: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to `total`, each within one of its share of it (largest remainder)."""
    quota = np.asarray(shares, dtype=np.float64) / np.sum(shares) * total
    counts = np.floor(quota).astype(np.int64)
    left = total - int(counts.sum())
    counts[np.argsort(counts - quota, kind="stable")[:left]] += 1
    return counts


def blend_pattern(
    weights: np.ndarray, length: int = BLEND_PATTERN_LEN
) -> tuple[np.ndarray, np.ndarray]:
    """One repetition of the blend schedule: (source of each slot, its draw number).

    draw[r] counts the earlier slots of the same source, so global sample g, in repetition
    g // P at slot r = g % P, is draw `(g // P) * count[source] + draw[r]` of its source: O(1)
    for any g. Slots are apportioned to the weights by largest remainder (each source within
    one slot of weight * length); a source with a positive weight too small for a slot gets one
    anyway, so it is never starved, which lengthens the pattern by one slot per such source.
    A source's slots are spread evenly (its k-th near (k + 1/2) / count of the way through),
    so any window of the stream, not only whole patterns, is mixed close to the weights.
    """
    weights = np.asarray(weights, dtype=np.float64)
    counts = apportion(weights, length)
    counts[(weights > 0) & (counts == 0)] = 1
    sources = np.repeat(np.arange(len(counts)), counts)
    draws = np.concatenate([np.arange(c) for c in counts])
    order = np.lexsort((sources, (draws + 0.5) / counts[sources]))
    return sources[order], draws[order]


class PretrainData:
    """The training and validation samples of a blend of token sources.

    Global training sample g -> (source, draw) by the blend pattern; draw d of a source ->
    epoch d // num_train, and position d % num_train of that epoch (`indices.EpochIndex`,
    seeded by (seed, source index, epoch)). The constructor only checks; `prepare()` makes
    the samples readable.
    """

    def __init__(
        self, cfg: DataConfig, *, vocab_size: int, cache_dir: str | Path | None = None
    ) -> None:
        cfg.validate()
        self.seq_len = cfg.seq_len
        self.seed = cfg.seed
        self.document_mask = cfg.document_mask
        self.vocab_size = vocab_size
        self.build_timeout_s = cfg.build_timeout_s
        self.sources = [
            TokenSource(
                path, vocab_size=vocab_size, seq_len=cfg.seq_len, valid_fraction=cfg.valid_fraction
            )
            for path in cfg.paths
        ]
        self.eos_id = _resolve_eos_id(cfg.eos_id, self.sources)
        weights = [s.num_train for s in self.sources] if cfg.weights is None else cfg.weights
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.pattern, self._pattern_draws = blend_pattern(self.weights)
        self._pattern_counts = np.bincount(self.pattern, minlength=len(self.sources))
        self._valid_offsets = np.cumsum([0] + [s.num_valid for s in self.sources])
        cache_dir = cfg.cache_dir if cache_dir is None else cache_dir
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if self.cache_dir is not None:
            _check_writable(self.cache_dir)
        self._epochs: list[list[indices.EpochIndex]] = [[] for _ in self.sources]
        self._low_level_datasets: list[Any] = [None] * len(self.sources)
        self.num_prepared = 0  # training samples readable

    # Preparation ----------------------------------------------------------------------------
    def prepare(self, num_samples: int) -> None:
        """Make the first `num_samples` global training samples readable.

        Collective when torch.distributed is initialized (every rank calls it, once the
        process group exists and before the first step): data without a sidecar has its
        token range scanned, each rank a 1/world share, unless cached; rank 0 builds the
        indices of every epoch of every source that these samples reach, unless cached,
        while the others wait; then every rank memory-maps them. Nothing here grows with the
        corpus on a rank other than 0, and nothing is built later in the step loop. Raises
        the same ValueError on every rank when the data is unusable.
        """
        if num_samples < 0:
            raise ValueError(f"num_samples={num_samples} must be >= 0")
        if self.cache_dir is None:
            raise ValueError(
                "PretrainData needs a folder for its sample indices: set data.cache_dir "
                "(pretraining defaults it to RUN_DIR/data_cache)"
            )
        folders = [indices.source_folder(self.cache_dir, s.prefix) for s in self.sources]
        self._check_token_ranges(folders)

        drawn = self.samples_drawn(num_samples)
        wanted = [
            [
                indices.EpochIndex(
                    self._low_level(i),
                    prefix=source.prefix,
                    train_sequences=source.train_sequences,
                    seq_len=self.seq_len,
                    seed=indices.epoch_seed(self.seed, i, epoch),
                    # Everything the index depends on names its folder: another seq_len,
                    # hold-out or seed (a resume under a changed config) gets its own.
                    folder=folders[i]
                    / (
                        f"epoch-{epoch:05d}-seq{self.seq_len}-train{source.train_sequences}"
                        f"-seed{indices.epoch_seed(self.seed, i, epoch)}"
                    ),
                )
                for epoch in range(len(self._epochs[i]), math.ceil(d / source.num_train))
            ]
            for i, (source, d) in enumerate(zip(self.sources, drawn, strict=True))
        ]

        def build() -> int:
            try:
                return sum(epoch.build() for epochs in wanted for epoch in epochs)
            except OSError as e:
                raise ValueError(
                    f"cannot write the sample indices under data.cache_dir={self.cache_dir}: "
                    f"{e}; set data.cache_dir to a writable folder that every rank sees"
                ) from e

        # May take minutes at scale: the wait has its own timeout, data.build_timeout_s.
        indices.on_rank_zero(build, timeout_s=self.build_timeout_s)
        error = None
        try:
            for epochs in wanted:
                for epoch in epochs:
                    epoch.open()
        except OSError as e:
            rank, _ = indices.world()
            error = (
                f"rank {rank} cannot read the sample indices rank 0 wrote under "
                f"data.cache_dir={self.cache_dir} ({e}); it must be a folder every rank "
                "sees, e.g. on the shared filesystem of the run folder"
            )
        indices.raise_if_any_failed(
            error,
            others=f"another rank cannot read the sample indices under data.cache_dir="
            f"{self.cache_dir} (see its error); it must be a folder every rank sees",
        )
        for mine, new in zip(self._epochs, wanted, strict=True):
            mine.extend(new)
        self.num_prepared = max(self.num_prepared, num_samples)

    def _low_level(self, source: int) -> Any:
        """The source's Megatron IndexedDataset (memory-mapped), opened once."""
        if self._low_level_datasets[source] is None:
            self._low_level_datasets[source] = indices.open_low_level(self.sources[source].prefix)
        return self._low_level_datasets[source]

    def _check_token_ranges(self, folders: list[Path]) -> None:
        """The vocabulary check of data without a sidecar: its token range, read from the
        cache, else scanned in shares over the ranks (no rank reads a whole .bin) and cached
        by rank 0. One rank alone would read a 2T-token corpus (4 TB) for longer than a
        collective waits."""
        unchecked = [i for i, s in enumerate(self.sources) if s.meta is None]
        if not unchecked:
            return
        cached = indices.on_rank_zero(
            lambda: [indices.read_token_range(folders[i]) for i in unchecked]
        )
        to_scan = [i for i, r in zip(unchecked, cached, strict=True) if r is None]
        shares = []
        for i in to_scan:
            tokens = self.sources[i].tokens
            mine = tokens[indices.shard(len(tokens))]
            shares.append(_token_range(mine) if len(mine) else None)
        scanned = dict(zip(to_scan, indices.reduce_token_ranges(shares), strict=True))
        rank, _ = indices.world()
        if rank == 0:
            for i, (low, high) in scanned.items():
                try:
                    indices.write_token_range(folders[i], low, high)
                except OSError as e:  # only costs a scan next time; build() reports the folder
                    log.warning("could not cache the token range of %s: %s", folders[i], e)
        for i, known in zip(unchecked, cached, strict=True):
            self.sources[i].check_token_range(*(known if known is not None else scanned[i]))

    # Training -------------------------------------------------------------------------------
    def locate(self, g: int) -> tuple[int, int]:
        """(source, draw): global training sample g is the draw-th sample taken from source."""
        if g < 0:
            raise ValueError(f"training sample index {g} must be >= 0")
        repetition, slot = divmod(g, len(self.pattern))
        source = int(self.pattern[slot])
        return source, repetition * int(self._pattern_counts[source]) + int(
            self._pattern_draws[slot]
        )

    def train_index(self, g: int) -> tuple[int, int, int]:
        """(source, epoch, position within the epoch) of global training sample g."""
        source, draw = self.locate(g)
        epoch, position = divmod(draw, self.sources[source].num_train)
        if epoch >= len(self._epochs[source]):
            raise IndexError(
                f"training sample {g} is in epoch {epoch} of {self.sources[source].prefix}, "
                f"beyond those prepared (for {self.num_prepared} samples); call "
                f"PretrainData.prepare(num_samples) with num_samples > {g} before training"
            )
        return source, epoch, position

    def train_sample(self, g: int) -> np.ndarray:
        """Global training sample g: seq_len + 1 int64 tokens."""
        source, epoch, position = self.train_index(g)
        return self._epochs[source][epoch].sample(position)

    def samples_drawn(self, num_samples: int) -> list[int]:
        """How many of the first `num_samples` global samples each source provides."""
        repetitions, slots = divmod(num_samples, len(self.pattern))
        partial = np.bincount(self.pattern[:slots], minlength=len(self.sources))
        return (repetitions * self._pattern_counts + partial).tolist()

    def epochs(self, num_samples: int) -> list[float]:
        """Epochs of each source that the first `num_samples` global samples amount to."""
        drawn = self.samples_drawn(num_samples)
        return [d / s.num_train for d, s in zip(drawn, self.sources, strict=True)]

    # Validation -----------------------------------------------------------------------------
    @property
    def num_valid_samples(self) -> int:
        return int(self._valid_offsets[-1])

    def valid_index(self, i: int) -> tuple[int, int]:
        """(source, held-out sample of that source) of validation sample i: sources in order,
        each source's held-out samples in stream order."""
        if not 0 <= i < self.num_valid_samples:
            raise IndexError(f"validation sample {i} outside [0, {self.num_valid_samples})")
        source = int(np.searchsorted(self._valid_offsets, i, side="right")) - 1
        return source, i - int(self._valid_offsets[source])

    def valid_sample(self, i: int) -> np.ndarray:
        source, k = self.valid_index(i)
        return self.sources[source].valid_sample(k)

    def micro_batch(self, rows: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """The batch dict of some samples: `tokens` (bsz, seq_len + 1) int64, and with
        document_mask `document_ids` and `position_ids` (bsz, seq_len) of the inputs."""
        tokens = torch.from_numpy(np.stack(rows))
        batch = {"tokens": tokens}
        if self.document_mask:
            document_ids, position_ids = document_ids_from_tokens(tokens[:, :-1], self.eos_id)
            batch["document_ids"] = document_ids
            batch["position_ids"] = position_ids
        return batch

    def __repr__(self) -> str:
        weights = ", ".join(f"{w:.4g}" for w in self.weights)
        return f"PretrainData({self.sources}, weights=[{weights}], seq_len={self.seq_len})"


def _check_writable(folder: Path) -> None:
    """A cache folder that rank 0 can create and write (checked before launch)."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"data.cache_dir={folder} cannot be written ({existing} is not a writable "
            "folder); set data.cache_dir to a writable folder that every rank sees"
        )


def check_data_tokenizer(sources: list[TokenSource], tokenizer: Any) -> None:
    """Each dataset was tokenized with `tokenizer` (a `llama_dist.tokenizer.Tokenizer`), as far
    as its sidecar records: the model's sha256 where it has one (data prepared by this
    version), else its vocabulary size and bos/eos ids. Data without a sidecar is not checked.
    Raises a ValueError naming the dataset and both tokenizers."""
    for source in sources:
        meta = source.meta
        if meta is None:
            continue
        where = f"{source.prefix}.meta.json"
        if meta.get("bos") is False:
            log.warning(
                "the documents of %s do not start with BOS (%s: bos false), while sampling "
                "and the chat format start every prompt with it: its embedding stays untrained; "
                "prepare the data again without --no-bos",
                source.prefix,
                where,
            )
        recorded = meta.get("tokenizer", "an unrecorded tokenizer")
        fix = (
            f"pass the tokenizer it was prepared with (tokenizer={recorded}), or prepare "
            f"{source.prefix} again with --tokenizer {tokenizer.path}"
        )
        sha = meta.get("tokenizer_sha256")
        if sha is not None:
            if sha != tokenizer.sha256:
                raise ValueError(
                    f"dataset {source.prefix!r} was tokenized with another tokenizer than "
                    f"tokenizer={tokenizer.path}: {where} records {recorded} (sha256 {sha[:12]}), "
                    f"this one is sha256 {tokenizer.sha256[:12]}; {fix}"
                )
            continue
        ours = {"vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id}
        ours["eos_id"] = tokenizer.eos_id
        differ = [f"{k} {meta[k]} vs {v}" for k, v in ours.items() if k in meta and meta[k] != v]
        if differ:
            raise ValueError(
                f"dataset {source.prefix!r} was tokenized with another tokenizer than "
                f"tokenizer={tokenizer.path}: {where} records {', '.join(differ)}; {fix}"
            )


def _resolve_eos_id(configured: int | None, sources: list[TokenSource]) -> int:
    recorded = {s.eos_id for s in sources if s.eos_id is not None}
    if len(recorded) > 1:
        raise ValueError(
            f"the datasets record different eos ids {sorted(recorded)}: they were tokenized "
            "with different tokenizers; prepare them all with the model's tokenizer"
        )
    if configured is not None:
        if recorded and configured not in recorded:
            raise ValueError(
                f"data.eos_id={configured}, but the datasets were tokenized with eos id "
                f"{recorded.pop()}; leave data.eos_id unset to use the recorded one"
            )
        return configured
    return recorded.pop() if recorded else DEFAULT_EOS_ID


def document_ids_from_tokens(
    inputs: torch.Tensor, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(document_ids, position_ids), both shaped like `inputs` (bsz, seqlen), int64.

    The token after an EOS starts a new document, whose positions restart at 0; a row starts
    document 0 at position 0, whether or not a document truly begins there.
    """
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 1:] = inputs[:, :-1] == eos_id
    document_ids = starts.cumsum(dim=1)
    positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    # Position of the latest document start at or before each token.
    last_start = torch.where(starts, positions, 0).cummax(dim=1).values
    return document_ids, positions - last_start


class TrainLoader:
    """Training micro-batches of one data-parallel rank, one optimizer step per `next()`.

    Step s holds global samples [s * global_batch, (s + 1) * global_batch) (counted from
    `consumed_samples`); rank r takes the contiguous slice of `global_batch // dp_size` of
    them at offset r * global_batch // dp_size and cuts it, in order, into
    `grad_accum` micro-batches of `micro_batch` (see `PretrainData.micro_batch` for the
    keys). The position is global, so `state_dict()` saved at one dp size resumes at another.
    """

    def __init__(
        self,
        data: PretrainData,
        *,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        prefetch: bool = False,
        device: torch.device | None = None,
    ) -> None:
        for name, value in (
            ("global_batch", global_batch),
            ("micro_batch", micro_batch),
            ("dp_size", dp_size),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        per_step = micro_batch * dp_size
        if global_batch % per_step:
            nearest = max(per_step, round(global_batch / per_step) * per_step)
            raise ValueError(
                f"global_batch={global_batch} is not divisible by micro_batch={micro_batch} x "
                f"dp_size={dp_size} = {per_step}; every rank must run the same number of "
                f"micro-batches: choose a global batch that is a multiple of {per_step} "
                f"(e.g. {nearest}) or change micro_batch"
            )
        self.data = data
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.per_rank = global_batch // dp_size
        self.grad_accum = self.per_rank // micro_batch
        self.consumed_samples = 0
        self._prefetcher = _Prefetcher(self.step_at, device) if prefetch else None

    def __iter__(self) -> TrainLoader:
        return self

    def step_at(self, consumed_samples: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the step that starts at `consumed_samples` (pure: the
        position does not move)."""
        first = consumed_samples + self.dp_rank * self.per_rank
        return [
            self.data.micro_batch(
                [self.data.train_sample(g) for g in range(start, start + self.micro_batch)]
            )
            for start in range(first, first + self.per_rank, self.micro_batch)
        ]

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        position = self.consumed_samples
        step = None if self._prefetcher is None else self._prefetcher.take(position)
        if step is None:
            step = self.step_at(position)
        # Counted when handed out, so a checkpoint written after this step resumes after it
        # (a prefetched step is not handed out until asked for).
        self.consumed_samples += self.global_batch
        if self._prefetcher is not None:
            self._prefetcher.schedule(self.consumed_samples)
        return step

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples={consumed} in the loader state must be >= 0")
        self.consumed_samples = consumed


class _Prefetcher:
    """The next step's micro-batches, built in a background thread while the current step
    runs: on CUDA pinned and copied to the device on a side stream (the step's stream waits for
    the copy's event), elsewhere left on the host. Keyed by the loader position, so a step
    prefetched for a position the loader left (a resume loads another) is dropped."""

    def __init__(self, compute, device: torch.device | None) -> None:
        self._compute = compute
        self._device = device
        self._cuda = device is not None and device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llama_dist-prefetch")
        self._pending: tuple[int, Future] | None = None
        self.hits = 0  # steps handed out from the prefetch (for tests)

    def schedule(self, position: int) -> None:
        self._pending = (position, self._pool.submit(self._prepare, position))

    def _prepare(self, position: int):
        step = self._compute(position)
        if not self._cuda:
            return step, None
        with torch.cuda.stream(self._stream):
            step = [
                {k: v.pin_memory().to(self._device, non_blocking=True) for k, v in mb.items()}
                for mb in step
            ]
            event = torch.cuda.Event()
            event.record(self._stream)
        return step, event

    def take(self, position: int) -> list[dict[str, torch.Tensor]] | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        key, future = pending
        step, event = future.result()  # also when stale: no two threads build at once
        if key != position:
            return None
        if event is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(event)
            for mb in step:
                for t in mb.values():
                    t.record_stream(current)
        self.hits += 1
        return step

    def close(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)


class ValidLoader:
    """Validation micro-batches of one data-parallel rank, in a fixed order.

    Batch b holds validation samples [b * micro_batch * dp_size, (b + 1) * ...), rank r the
    r-th run of `micro_batch` of them. Every rank yields the same number of batches (with
    FSDP each forward is collective); rows past the end repeat a real sample and have
    `sample_mask` False (a (micro_batch,) bool tensor, next to the `PretrainData.micro_batch`
    keys), so a loss summed over the mask and all ranks covers each sample exactly once.
    `max_samples` evaluates a fixed subset: each source's first held-out samples, in
    proportion to how many it has.
    """

    def __init__(
        self,
        data: PretrainData,
        *,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        max_samples: int | None = None,
    ) -> None:
        if micro_batch < 1 or dp_size < 1:
            raise ValueError(f"micro_batch={micro_batch} and dp_size={dp_size} must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples={max_samples} must be >= 1, or None for all")
        self.data = data
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        available = np.array([s.num_valid for s in data.sources], dtype=np.int64)
        offsets = np.cumsum(available) - available
        taken = available
        if max_samples is not None and max_samples < available.sum():
            taken = apportion(available, max_samples)
        # Global validation indices (see PretrainData.valid_index) of the samples evaluated.
        self.indices = np.concatenate(
            [np.arange(n, dtype=np.int64) + o for n, o in zip(taken, offsets, strict=True)]
        )
        self.num_batches = math.ceil(len(self.indices) / (micro_batch * dp_size))

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        num = len(self.indices)
        for b in range(self.num_batches):
            start = (b * self.dp_size + self.dp_rank) * self.micro_batch
            positions = np.arange(start, start + self.micro_batch)
            real = positions < num
            rows = [
                self.data.valid_sample(int(self.indices[p if ok else 0]))
                for p, ok in zip(positions, real, strict=True)
            ]
            batch = self.data.micro_batch(rows)
            batch["sample_mask"] = torch.from_numpy(real)
            yield batch
