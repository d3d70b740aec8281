"""Supervised fine-tuning data: dialogs read from JSON/JSONL, tokenised once, packed.

Records come in three layouts, converted on load (one file may mix them):

    {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
    {"instruction": ..., "input": ..., "output": ..., "system": ...}   Alpaca
    {"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...]}   ShareGPT

Each dialog is rendered with the Llama 2 chat template (`data.chat.encode_dialog`) and must
end with an assistant answer. The loss is on answer tokens only: every assistant turn, or
the last one (`train_on="last"`, what Ghost Attention needs). A record may also choose for
itself with a key `"train_on": "last"` (or `"all"`, the default), so Ghost Attention samples
(`data.gatt`) train on their last turn only when mixed with ordinary dialogs; `train_on="last"`
in the config applies to every record whatever its key. Token ids and masks are cached next
to the data file (`FILE.tokens-<key>/`), keyed by the file's and the tokenizer's contents, so
a rerun does not tokenise again.

A sample of n tokens gives n - 1 (input, label) pairs. Samples are packed whole into rows of
`seq_len` pairs; each sample keeps its own document id (attention stays inside it) and its
own positions from 0, so a packed row gives each sample the loss it has alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama_dist.data.chat import encode_dialog
from llama_dist.data.epochs import EpochLoader, rank_chunks
from llama_dist.data.records import read_records
from llama_dist.losses import IGNORE_INDEX
from llama_dist.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMATS = ("auto", "messages", "alpaca", "sharegpt")
TRAIN_ON = ("all", "last")
OVERLONG = ("truncate", "drop")
# Bumped whenever the cached arrays would come out differently for the same inputs.
_CACHE_VERSION = 2  # 2: a record's own "train_on" narrows its answer_mask
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}
# Padding in packed rows: any valid id, never attended to by a sample and never a label.
PAD_ID = 0


@dataclass
class SFTDataConfig:
    """Dialog files and how they become training rows."""

    paths: list[str] = field(default_factory=list)  # JSON or JSONL files, concatenated
    format: str = "auto"  # auto (per record) | messages | alpaca | sharegpt
    seq_len: int = 4096  # (input, label) pairs per packed row (llama2.md: 4096)
    # all: every assistant turn (a record with "train_on": "last" its last only) | last: the
    # last turn of every record
    train_on: str = "all"
    pack: bool = True  # several samples per row; false: one sample per row, padded
    overlong: str = "truncate"  # a sample longer than seq_len: truncate (keep its start) | drop
    skip_invalid: bool = False  # count and report malformed records instead of failing
    valid_fraction: float = 0.0  # share of the samples held out for the validation loss
    seed: int = 1234  # the per-epoch shuffles and the held-out choice
    cache: bool = True  # cache token ids next to each data file

    def validate(self) -> SFTDataConfig:
        if not self.paths:
            raise ValueError(
                "sft data paths are empty; set data.paths=[FILE.jsonl, ...] (messages, Alpaca "
                "or ShareGPT records)"
            )
        for name, value, allowed in (
            ("format", self.format, FORMATS),
            ("train_on", self.train_on, TRAIN_ON),
            ("overlong", self.overlong, OVERLONG),
        ):
            if value not in allowed:
                raise ValueError(f"data.{name}={value!r} must be one of {allowed}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len!r} must be an integer >= 2")
        if not 0.0 <= self.valid_fraction < 0.5:
            raise ValueError(
                f"data.valid_fraction={self.valid_fraction} must be in [0, 0.5); 0 holds "
                "nothing out"
            )
        for path in self.paths:
            if not Path(path).is_file():
                raise ValueError(f"data file {path} does not exist; check data.paths")
        return self


# Reading ------------------------------------------------------------------------------------
def detect_format(record: Any) -> str:
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record and "output" in record:
            return "alpaca"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(
        f"record of unknown layout (keys {keys}); expected 'messages', 'conversations' "
        "(ShareGPT) or 'instruction' + 'output' (Alpaca)"
    )


def to_dialog(record: Any, fmt: str = "auto") -> list[dict[str, str]]:
    """A record of any supported layout as a list of {role, content} messages."""
    fmt = detect_format(record) if fmt == "auto" else fmt
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if fmt == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list of {role, content} objects")
        return [dict(m) if isinstance(m, dict) else m for m in messages]
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"an Alpaca record needs a string {key!r}")
        user = record["instruction"].strip()
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError("an Alpaca record's 'input' must be a string")
        if extra.strip():
            user = f"{user}\n\n{extra.strip()}"
        dialog = []
        if record.get("system"):
            dialog.append({"role": "system", "content": record["system"]})
        # LLaMA-Factory's optional earlier turns: [[user, assistant], ...]
        for turn in record.get("history") or []:
            if not (isinstance(turn, list) and len(turn) == 2):
                raise ValueError("an Alpaca record's 'history' must hold [user, assistant] pairs")
            dialog += [
                {"role": "user", "content": turn[0]},
                {"role": "assistant", "content": turn[1]},
            ]
        return dialog + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": record["output"]},
        ]
    if fmt == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise ValueError("'conversations' must be a list of {from, value} objects")
        dialog = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or not {"from", "value"} <= turn.keys():
                raise ValueError(f"conversation turn {i} must have 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise ValueError(
                    f"conversation turn {i} is from {turn['from']!r}; supported: "
                    f"{sorted(_SHAREGPT_ROLES)}"
                )
            dialog.append({"role": role, "content": turn["value"]})
        if record.get("system"):
            dialog.insert(0, {"role": "system", "content": record["system"]})
        return dialog
    raise ValueError(f"data.format={fmt!r} must be one of {FORMATS}")


def record_train_on(record: dict) -> str:
    """The record's own choice of trained turns: its "train_on" key, "all" when absent."""
    value = record.get("train_on", "all")
    if value not in TRAIN_ON:
        raise ValueError(f"the record's 'train_on'={value!r} must be one of {TRAIN_ON}")
    return value


def check_sft_dialog(dialog: Sequence[dict[str, str]]) -> None:
    """What SFT needs beyond a valid chat: an answer at the end, and no empty answer."""
    if not dialog or dialog[-1].get("role") != "assistant":
        raise ValueError("the dialog does not end with an assistant answer; SFT trains on it")
    for i, message in enumerate(dialog):
        if message.get("role") == "assistant" and not str(message.get("content", "")).strip():
            raise ValueError(f"message {i} is an empty assistant answer")


# Tokenising and caching -------------------------------------------------------------------------
@dataclass
class TokenizedDialogs:
    """Token ids of many dialogs in flat arrays; sample i is [offsets[i], offsets[i + 1])."""

    ids: np.ndarray  # int32
    answer_mask: np.ndarray  # bool: every assistant turn (the last only if the record asks)
    last_mask: np.ndarray  # bool: the last assistant turn only
    offsets: np.ndarray  # int64, num_samples + 1
    skipped: list[str]  # "where: why" of each malformed record left out

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_folder(path: str | os.PathLike, tokenizer: Tokenizer, fmt: str) -> Path:
    """Where the tokens of data file `path` are cached: beside it, keyed by the contents of
    the file and of the tokenizer, and the layout."""
    path = Path(path)
    key = hashlib.sha256(
        f"{_CACHE_VERSION}:{fmt}:{_file_digest(path)}:{_file_digest(Path(tokenizer.path))}".encode()
    ).hexdigest()[:16]
    return path.with_name(f"{path.name}.tokens-{key}")


def tokenize_file(
    path: str | os.PathLike, tokenizer: Tokenizer, *, fmt: str = "auto", skip_invalid: bool
) -> TokenizedDialogs:
    """Read and tokenise one file; a malformed record is a ValueError naming its file and
    line, or with `skip_invalid` a skip recorded in `skipped`."""
    ids: list[int] = []
    answer: list[bool] = []
    last: list[bool] = []
    offsets = [0]
    skipped: list[str] = []
    for where, record in read_records(path):
        if isinstance(record, ValueError):  # a line that is not JSON is never skipped
            raise ValueError(f"{where}: {record}")
        try:
            dialog = to_dialog(record, fmt)
            tokens = encode_dialog(tokenizer, dialog)  # validates the chat itself first
            check_sft_dialog(dialog)
            own_train_on = record_train_on(record)
        except ValueError as e:
            if not skip_invalid:
                raise ValueError(
                    f"{where}: {e} (fix the record, or set data.skip_invalid=true to skip "
                    "malformed records)"
                ) from None
            skipped.append(f"{where}: {e}")
            continue
        ids += tokens.ids
        last_mask = tokens.last_answer_mask()
        # answer_mask is what train_on="all" trains on: a record asking for its last turn
        # narrows it, so it can be mixed with ordinary dialogs in one job.
        answer += last_mask if own_train_on == "last" else tokens.answer_mask
        last += last_mask
        offsets.append(len(ids))
    return TokenizedDialogs(
        ids=np.asarray(ids, dtype=np.int32),
        answer_mask=np.asarray(answer, dtype=bool),
        last_mask=np.asarray(last, dtype=bool),
        offsets=np.asarray(offsets, dtype=np.int64),
        skipped=skipped,
    )


def _save_cache(folder: Path, data: TokenizedDialogs, source: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in ("ids", "answer_mask", "last_mask", "offsets"):
            np.save(tmp / f"{name}.npy", getattr(data, name))
        meta = {"source": str(source), "samples": data.num_samples, "skipped": data.skipped}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, folder)  # atomic: a reader sees a complete cache or none
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():  # another process may have won the race, which is fine
            log.warning("could not cache tokens of %s in %s (%s); continuing", source, folder, e)


def _load_cache(folder: Path) -> TokenizedDialogs:
    arrays = {
        name: np.load(folder / f"{name}.npy", mmap_mode="r")
        for name in ("ids", "answer_mask", "last_mask", "offsets")
    }
    meta = json.loads((folder / "meta.json").read_text())
    return TokenizedDialogs(**arrays, skipped=list(meta["skipped"]))


def load_tokenized(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    fmt: str = "auto",
    skip_invalid: bool = False,
    cache: bool = True,
    write_cache: bool = True,
) -> tuple[TokenizedDialogs, bool]:
    """(tokens of `path`, whether they came from the cache). Only a process with
    `write_cache` writes a missing cache (rank 0; the others tokenise for themselves)."""
    path = Path(path)
    folder = cache_folder(path, tokenizer, fmt) if cache else None
    if folder is not None and (folder / "meta.json").is_file():
        data, hit = _load_cache(folder), True
    else:
        data, hit = tokenize_file(path, tokenizer, fmt=fmt, skip_invalid=True), False
        if folder is not None and write_cache:
            _save_cache(folder, data, path)
    if data.skipped and not skip_invalid:
        raise ValueError(
            f"{data.skipped[0]} (fix the record, or set data.skip_invalid=true to skip "
            f"malformed records; {len(data.skipped)} in this file)"
        )
    return data, hit


# Samples and packing ---------------------------------------------------------------------------
@dataclass
class SFTSamples:
    """The training samples of all files, each cut to at most seq_len + 1 tokens."""

    ids: list[np.ndarray]
    labels_mask: list[np.ndarray]  # per token: trained on (as a label)
    stats: dict[str, int]


def build_samples(
    sources: Sequence[TokenizedDialogs], *, seq_len: int, train_on: str, overlong: str
) -> SFTSamples:
    """Samples of every source, over-long ones truncated or dropped (counted in `stats`).

    A sample truncated to seq_len + 1 tokens keeps its start (system prompt and first turns);
    one left without a trained token is dropped.
    """
    ids, masks = [], []
    stats = {"samples": 0, "truncated": 0, "dropped_overlong": 0, "dropped_no_answer": 0}
    stats["skipped_invalid"] = sum(len(s.skipped) for s in sources)
    for source in sources:
        mask_all = source.last_mask if train_on == "last" else source.answer_mask
        for i in range(source.num_samples):
            start, end = int(source.offsets[i]), int(source.offsets[i + 1])
            sample, mask = np.asarray(source.ids[start:end]), np.asarray(mask_all[start:end])
            if len(sample) - 1 > seq_len:
                if overlong == "drop":
                    stats["dropped_overlong"] += 1
                    continue
                sample, mask = sample[: seq_len + 1], mask[: seq_len + 1]
                if not mask[1:].any():
                    stats["dropped_no_answer"] += 1
                    continue
                stats["truncated"] += 1
            ids.append(sample)
            masks.append(mask)
    stats["samples"] = len(ids)
    return SFTSamples(ids=ids, labels_mask=masks, stats=stats)


def pack(
    lengths: Sequence[int], order: Sequence[int], seq_len: int, *, pack: bool
) -> list[list[int]]:
    """Rows of sample indices, in `order`: each row holds whole samples whose (input, label)
    pairs (length - 1 each) fit in seq_len; a sample that does not fit starts a new row."""
    rows: list[list[int]] = []
    used = seq_len + 1  # forces a new row first
    for i in order:
        n = lengths[i] - 1
        if not pack or used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += n
    return rows


def row_batch(samples: SFTSamples, rows: Sequence[Sequence[int]], seq_len: int) -> dict:
    """A micro-batch of packed rows: tokens (inputs), labels, document_ids, position_ids,
    each (len(rows), seq_len). Padding is a document of its own with no labels."""
    bsz = len(rows)
    tokens = torch.full((bsz, seq_len), PAD_ID, dtype=torch.long)
    labels = torch.full((bsz, seq_len), IGNORE_INDEX, dtype=torch.long)
    document_ids = torch.full((bsz, seq_len), -1, dtype=torch.long)
    position_ids = torch.zeros((bsz, seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for doc, i in enumerate(row):
            ids = torch.from_numpy(samples.ids[i].astype(np.int64))
            mask = torch.from_numpy(samples.labels_mask[i].copy())
            n = len(ids) - 1
            tokens[r, at : at + n] = ids[:-1]
            labels[r, at : at + n] = torch.where(mask[1:], ids[1:], IGNORE_INDEX)
            document_ids[r, at : at + n] = doc
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        document_ids[r, at:] = len(row)
    return {
        "tokens": tokens,
        "labels": labels,
        "document_ids": document_ids,
        "position_ids": position_ids,
    }


class SFTData:
    """Training and held-out samples of an SFT job, and the packed rows of each epoch."""

    def __init__(self, cfg: SFTDataConfig, tokenizer: Tokenizer, *, write_cache: bool) -> None:
        cfg.validate()
        self.cfg = cfg
        sources, self.cache_hits = [], 0
        for path in cfg.paths:
            data, hit = load_tokenized(
                path,
                tokenizer,
                fmt=cfg.format,
                skip_invalid=cfg.skip_invalid,
                cache=cfg.cache,
                write_cache=write_cache,
            )
            sources.append(data)
            self.cache_hits += hit
        self.skipped = [s for source in sources for s in source.skipped]
        samples = build_samples(
            sources, seq_len=cfg.seq_len, train_on=cfg.train_on, overlong=cfg.overlong
        )
        if not samples.ids:
            raise ValueError(
                f"no usable SFT samples in {list(cfg.paths)} ({samples.stats}); check the "
                "files, data.overlong and data.seq_len"
            )
        too_big = max(int(t.max()) for t in samples.ids)
        if too_big >= tokenizer.vocab_size:
            raise ValueError(f"token id {too_big} is beyond the tokenizer's vocabulary")
        self.samples = samples
        self.stats = dict(samples.stats)
        perm = np.random.default_rng(cfg.seed).permutation(len(samples.ids))
        num_valid = int(round(cfg.valid_fraction * len(perm)))
        if cfg.valid_fraction and num_valid == 0:
            num_valid = 1
        if num_valid >= len(perm):
            raise ValueError(
                f"data.valid_fraction={cfg.valid_fraction} leaves no training sample of "
                f"{len(perm)}; lower it"
            )
        self.valid_ids = np.sort(perm[:num_valid])
        self.train_ids = np.sort(perm[num_valid:])
        self.lengths = [len(t) for t in samples.ids]
        self.stats["train_samples"] = len(self.train_ids)
        self.stats["valid_samples"] = len(self.valid_ids)
        self._epoch_rows: dict[int, list[list[int]]] = {}
        self.valid_rows = pack(self.lengths, self.valid_ids, cfg.seq_len, pack=cfg.pack)

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """The packed rows of an epoch: the training samples shuffled by (seed, epoch)."""
        if epoch not in self._epoch_rows:
            rng = np.random.default_rng([self.cfg.seed, epoch])
            order = self.train_ids[rng.permutation(len(self.train_ids))]
            self._epoch_rows = {
                epoch: pack(self.lengths, order, self.cfg.seq_len, pack=self.cfg.pack)
            }
        return self._epoch_rows[epoch]

    def batch(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        return row_batch(self.samples, rows, self.cfg.seq_len)

    def labelled_tokens(self) -> int:
        """Trained-on tokens in one epoch of the training samples."""
        return int(sum(self.samples.labels_mask[i][1:].sum() for i in self.train_ids))


class SFTLoader(EpochLoader):
    """Training micro-batches of packed rows (`EpochLoader`); the position is saved as
    `consumed_rows`."""

    def __init__(
        self, data: SFTData, *, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
    ) -> None:
        super().__init__(
            data.epoch_rows,
            data.batch,
            global_batch=global_batch,
            micro_batch=micro_batch,
            dp_rank=dp_rank,
            dp_size=dp_size,
            state_key="consumed_rows",
            unit="rows",
        )


def valid_batches(
    data: SFTData, *, micro_batch: int, dp_rank: int, dp_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Held-out rows of this rank; every rank yields the same number of batches (forwards
    are collective), rows past the end repeat row 0 with `sample_mask` False."""
    for rows, real in rank_chunks(
        data.valid_rows, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size
    ):
        batch = data.batch(rows)
        batch["sample_mask"] = torch.tensor(real)
        yield batch
