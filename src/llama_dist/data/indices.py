"""What a pretraining job computes from its token data once, caches on disk and memory-maps
on every rank: per-epoch sample and shuffle indices, and the token range of data without a
sidecar.

Sample indices are Megatron's own: one `GPTDataset` per (source, epoch), built with
`num_samples=None` (exactly one epoch) from a seed drawn from (data.seed, source, epoch). It
shuffles the training documents, cuts the shuffled stream into windows of seq_len + 1 with
`helpers_cpp.build_sample_idx` and shuffles the windows, then saves document_index,
sample_index and shuffle_index as .npy files that every rank loads with mmap_mode="r".
Megatron's `BlendedMegatronDatasetBuilder` and a multi-epoch `GPTDataset` are not used, on
purpose: both size their indices by the run's total sample count, so changing train.steps
on resume would reorder the samples already trained on, and a multi-epoch GPTDataset shuffles
documents across epochs, so an epoch no longer holds every token once. Per-epoch datasets keep
both properties, and the blend stays `PretrainData`'s O(1) pattern (no file, zero weights
allowed), so a training sample is still a pure function of one integer.

Layout under the cache folder (`data.cache_dir`), one folder per source keyed by its files:

    NAME-FINGERPRINT/token_range.json      data without a sidecar: its smallest and largest id
    NAME-FINGERPRINT/epoch-00000-seqL-trainN-seedS/   Megatron's four files for epoch 0 at
                                           seq_len L, N training sequences, epoch seed S

A folder appears by an atomic rename of a finished temporary one, so a crash or a second job
building the same entry never leaves a partial index for a reader to map.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from llama_dist.data.prepare import megatron_indexed_dataset

# Bumped whenever the cached files would come out differently for the same inputs; part of
# Megatron's cache key through the tokenizer stand-in.
INDEX_VERSION = 1

log = logging.getLogger(__name__)
T = TypeVar("T")


def source_folder(cache_dir: Path, prefix: str) -> Path:
    """The cache folder of dataset `prefix`: named after it, keyed by the absolute path, size
    and modification time of its .bin and .idx, so data prepared again at the same prefix
    gets fresh entries."""
    prefix = os.path.abspath(prefix)
    stats = [os.stat(prefix + suffix) for suffix in (".bin", ".idx")]
    key = json.dumps([prefix, [(s.st_size, s.st_mtime_ns) for s in stats], INDEX_VERSION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(prefix).name}-{digest}"


def epoch_seed(seed: int, source: int, epoch: int) -> int:
    """Megatron's `random_seed` (numpy RandomState: below 2**32) for one source's epoch."""
    return int(np.random.SeedSequence([seed, source, epoch]).generate_state(1)[0])


class _TokenIds:
    """What `GPTDatasetConfig` asks of a tokenizer, for data that is token ids already. Its
    `unique_identifiers` enter Megatron's cache key; no vocabulary size, so Megatron never
    guesses the token dtype (the .idx records it)."""

    vocab_size = None
    unique_identifiers = {"class": "llama_dist.token_ids", "version": INDEX_VERSION}


def _gpt_config(*, prefix: str, seed: int, seq_len: int, split: str, path_to_cache: Path) -> Any:
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=([prefix], None),
        # Megatron's cache key holds the split, not the document indices handed to the
        # dataset: "train documents, held-out documents, 0" makes the hold-out part of it.
        split=split,
        path_to_cache=str(path_to_cache),
        tokenizer=_TokenIds(),
        # Masks and positions are ours (PretrainData.micro_batch); only the indices are used.
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


class EpochIndex:
    """One epoch of one source's training samples, read through Megatron's GPTDataset.

    `low_level` is the source's `IndexedDataset` (mmap=True); the training part is its first
    `train_sequences` sequences (whole documents: `TokenSource` holds out the rest).
    """

    def __init__(
        self,
        low_level: Any,
        *,
        prefix: str,
        train_sequences: int,
        seq_len: int,
        seed: int,
        folder: Path,
    ) -> None:
        self.low_level = low_level
        self.prefix = os.path.abspath(prefix)
        self.train_sequences = train_sequences
        self.seq_len = seq_len
        self.seed = seed
        self.folder = Path(folder)
        num_sequences = len(low_level.sequence_lengths)
        self._split = f"{train_sequences},{num_sequences - train_sequences},0"
        self.dataset: Any = None

    def _gpt_dataset(self, indices: np.ndarray | None, path_to_cache: Path) -> Any:
        from megatron.core.datasets.gpt_dataset import GPTDataset
        from megatron.core.datasets.utils import Split

        config = _gpt_config(
            prefix=self.prefix,
            seed=self.seed,
            seq_len=self.seq_len,
            split=self._split,
            path_to_cache=path_to_cache,
        )
        return GPTDataset(self.low_level, self.prefix, indices, None, Split.train, config)

    def build(self) -> bool:
        """Write the epoch's index files (one rank); False when they are cached already."""
        if self.folder.is_dir():
            return False
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.folder.with_name(f"{self.folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.perf_counter()
        indices = np.arange(self.train_sequences, dtype=np.int32)
        # Built in memory and saved by Megatron; dropped here, so this rank too maps the files.
        self._gpt_dataset(indices, tmp)
        try:
            os.rename(tmp, self.folder)
        except OSError:
            if not self.folder.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another job built the same entry first
        log.info(
            "built the sample indices of %s in %s (%.1fs)",
            self.prefix,
            self.folder,
            time.perf_counter() - started,
        )
        return True

    def open(self) -> None:
        """Map the cached index files (every rank)."""
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} does not exist")
        # Megatron loads with mmap_mode="r" when all four files exist; the document indices
        # are only read to build, so none are passed.
        self.dataset = self._gpt_dataset(None, self.folder)

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, position: int) -> np.ndarray:
        """The epoch's position-th sample (shuffled): seq_len + 1 int64 tokens."""
        tokens, _ = self.dataset._query_document_sample_shuffle_indices(position)
        return tokens


def read_token_range(folder: Path) -> tuple[int, int] | None:
    path = folder / "token_range.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return int(record["min_token_id"]), int(record["max_token_id"])


def write_token_range(folder: Path, low: int, high: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"token_range.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"min_token_id": low, "max_token_id": high}) + "\n")
    os.replace(tmp, folder / "token_range.json")


# Collectives of the preparation ------------------------------------------------------------
def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_rank_zero(fn: Callable[[], T], *, timeout_s: float | None = None) -> T:
    """fn() on rank 0 alone, its result broadcast to every rank (the others wait for it).

    A ValueError there is raised on every rank as itself; any other failure is re-raised on
    rank 0 and named in a RuntimeError on the others, instead of leaving them to a collective
    timeout. `timeout_s`: how long the others may wait, when fn() can outlast the process
    group's collective timeout (the wait then runs on a gloo group of its own).
    """
    rank, size = world()
    if size == 1:
        return fn()
    group = None
    if timeout_s is not None:
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    message: list[Any] = [None, None, None]  # result, ValueError text, other failure
    failure: BaseException | None = None
    if rank == 0:
        try:
            message[0] = fn()
        except ValueError as e:
            message[1] = str(e)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it
            failure, message[2] = e, f"{type(e).__name__}: {e}"
    try:
        dist.broadcast_object_list(message, src=0, group=group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)
    if message[1] is not None:
        raise ValueError(message[1])
    if failure is not None:
        raise failure
    if message[2] is not None:
        raise RuntimeError(f"rank 0 failed while preparing the data: {message[2]}")
    return message[0]


def raise_if_any_failed(error: str | None, *, others: str) -> None:
    """Every rank raises a ValueError if any rank has an `error` (its own text, or `others`)."""
    rank, size = world()
    if size > 1:
        flag = torch.tensor([error is not None], dtype=torch.int32, device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and error is None:
            error = others
    if error is not None:
        raise ValueError(error)


def reduce_token_ranges(ranges: list[tuple[int, int] | None]) -> list[tuple[int, int]]:
    """The smallest and largest id of each source over every rank's share of its tokens
    (None: this rank's share is empty)."""
    _, size = world()
    low_identity, high_identity = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    table = [(-low_identity, high_identity) if r is None else (-r[0], r[1]) for r in ranges]
    if size > 1:
        t = torch.tensor(table, dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        table = t.cpu().tolist()
    return [(-neg_low, high) for neg_low, high in table]


def shard(num_items: int) -> slice:
    """This rank's contiguous share of `num_items`."""
    rank, size = world()
    return slice(num_items * rank // size, num_items * (rank + 1) // size)


def open_low_level(prefix: str) -> Any:
    """The source's Megatron `IndexedDataset`, .idx and .bin memory-mapped."""
    return megatron_indexed_dataset().IndexedDataset(prefix, mmap=True)
