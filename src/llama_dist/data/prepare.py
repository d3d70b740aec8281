"""Tokenize text corpora into Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`).

Inputs are `.txt` files (one document per file, or per blank-line-separated paragraph) and
`.jsonl` files (one JSON object per line, its text under `text_key`); a directory stands for
the `.txt`/`.jsonl` files directly inside it. Every document is one sequence of the dataset
starts with BOS and ends with EOS, as Llama 2 documents do and as Megatron's
`preprocess_data.py --append-eod` with its Llama 2 tokenizer writes them, so either tool's
output trains the same way, and sampling (which starts every prompt with BOS) sees the
beginning it was trained on. `--no-bos` leaves BOS out. A sidecar
`PREFIX.meta.json` records the tokenizer and the largest token id, which lets the reader check
the data against the model without scanning it.

Command line: `python launch/prepare_data.py --input corpus/ --out data/corpus --tokenizer
tok/tokenizer.model --workers 8`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tqdm import tqdm

from llama_dist.tokenizer import Tokenizer

SUFFIXES = (".txt", ".jsonl")
SPLITS = ("file", "paragraph")
META_SUFFIX = ".meta.json"
# Documents handed to a worker at a time: large enough to amortise the pickling round trip,
# small enough that the progress bar moves on corpora of big documents.
CHUNKSIZE = 32
# One or more blank (or whitespace-only) lines separate paragraphs.
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def megatron_indexed_dataset() -> ModuleType:
    """`megatron.core.datasets.indexed_dataset`, imported on first use.

    Importing megatron.core takes seconds and warns that Transformer Engine and apex are
    missing; the indexed dataset code uses neither, so the import waits until a dataset is
    read or written and its warnings are dropped. Its INFO logs (on import, and a line per
    index read) are quieted too, unless the caller set the "megatron" logger's level.
    """
    megatron_log = logging.getLogger("megatron")
    if megatron_log.level == logging.NOTSET:
        megatron_log.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def meta_path(prefix: str | os.PathLike[str]) -> Path:
    return Path(str(prefix) + META_SUFFIX)


def read_meta(prefix: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of dataset `prefix`, or None for data written without one."""
    path = meta_path(prefix)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({e}); delete it (the data is read without it) "
            "or prepare the dataset again"
        ) from e
    missing = [k for k in ("vocab_size", "eos_id", "num_tokens", "max_token_id") if k not in meta]
    if missing:
        raise ValueError(
            f"{str(path)!r} lacks {missing}; delete it (the data is read without it) or "
            "prepare the dataset again"
        )
    return meta


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The input files in order, directories replaced by their sorted .txt/.jsonl files."""
    if not inputs:
        raise ValueError("no inputs given; pass .txt/.jsonl files or folders holding them")
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise ValueError(
                    f"folder {str(item)!r} holds no {' or '.join(SUFFIXES)} files; "
                    "point --input at the files or the folder that holds them"
                )
            files.extend(found)
        elif not item.is_file():
            raise ValueError(f"input {str(item)!r} does not exist")
        elif item.suffix not in SUFFIXES:
            raise ValueError(
                f"input {str(item)!r} has an unknown extension {item.suffix!r}; give "
                f"{' or '.join(SUFFIXES)} files (decompress or convert other formats first)"
            )
        else:
            files.append(item)
    return files


def iter_documents(
    files: Iterable[Path], *, split: str = "file", text_key: str = "text"
) -> Iterator[tuple[str, int]]:
    """(text, input bytes it came from) of every non-empty document, in input order."""
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_key)
            continue
        raw = path.read_bytes()
        text = _decode(raw, path)
        if split == "file":
            if text.strip():
                yield text, len(raw)
            continue
        for block in _PARAGRAPH_BREAK.split(text):
            block = block.strip("\r\n")
            if block.strip():
                yield block, len(block.encode("utf-8"))


def _jsonl_documents(path: Path, text_key: str) -> Iterator[tuple[str, int]]:
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(
                    f"{where} is not valid JSON ({e}); each line of a .jsonl file must be "
                    "one JSON object"
                ) from e
            if not isinstance(record, dict) or text_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{where} has no {text_key!r} field (it has {keys}); pass the field that "
                    "holds the text with --text-key"
                )
            text = record[text_key]
            if not isinstance(text, str):
                raise ValueError(
                    f"{where}: {text_key!r} holds a {type(text).__name__}, not a string; "
                    "pass the field that holds the text with --text-key"
                )
            if text.strip():
                yield text, len(raw)


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({e}); convert it to UTF-8") from e


class _Encoder:
    """Text -> int32 token ids with EOS appended; one per process, so the model loads once."""

    def __init__(self, tokenizer_path: str, bos: bool) -> None:
        self.tokenizer = Tokenizer(tokenizer_path)
        self.bos = bos

    def __call__(self, item: tuple[str, int]) -> tuple[np.ndarray, int]:
        text, num_bytes = item
        ids = self.tokenizer.encode(text, bos=self.bos, eos=True)
        return np.asarray(ids, dtype=np.int32), num_bytes


_worker_encoder: _Encoder | None = None


def _init_worker(tokenizer_path: str, bos: bool) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(tokenizer_path, bos)


def _encode_in_worker(item: tuple[str, int]) -> tuple[np.ndarray, int]:
    assert _worker_encoder is not None, "worker started without _init_worker"
    return _worker_encoder(item)


def prepare_data(
    inputs: Sequence[str | os.PathLike[str]],
    out_prefix: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str],
    *,
    workers: int | None = None,
    text_key: str = "text",
    split: str = "file",
    bos: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `inputs` into `out_prefix`.bin/.idx/.meta.json; returns the sidecar's contents.

    `split` applies to .txt inputs: "file" makes each file one document, "paragraph" each
    blank-line-separated block. Documents are tokenized by `workers` processes (None: one per
    CPU core) and written in input order, so the output does not depend on `workers`. The
    three files appear together at the end; a failed run leaves none of them behind.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    out_prefix = Path(out_prefix)
    if out_prefix.suffix in (".bin", ".idx") or out_prefix.name.endswith(META_SUFFIX):
        raise ValueError(
            f"out prefix {str(out_prefix)!r} names a dataset file; pass the prefix without "
            f"extension (e.g. {str(out_prefix.with_suffix(''))!r})"
        )
    files = expand_inputs(inputs)
    tokenizer = Tokenizer(tokenizer_path)
    tokenizer_path = str(Path(tokenizer_path).resolve())
    indexed_dataset = megatron_indexed_dataset()
    import torch  # here, not at the top, so --help and argument errors answer at once

    dtype = indexed_dataset.DType.optimal_dtype(tokenizer.vocab_size)
    documents = iter_documents(files, split=split, text_key=text_key)
    total_bytes = sum(f.stat().st_size for f in files)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    num_documents = num_tokens = 0
    max_token_id = -1
    # Built in a temporary folder beside the output so the final moves are renames on one
    # file system; a failed run leaves no partial dataset behind.
    with tempfile.TemporaryDirectory(dir=out_prefix.parent, prefix=f".{out_prefix.name}-") as tmp:
        tmp_prefix = Path(tmp) / out_prefix.name
        builder = indexed_dataset.IndexedDatasetBuilder(str(tmp_prefix) + ".bin", dtype=dtype)
        try:
            # The pool forks before the progress bar starts its monitor thread: a fork taken
            # while other threads run can inherit a lock one of them holds.
            with (
                _encoded(documents, tokenizer_path, bos=bos, workers=workers) as encoded,
                tqdm(
                    total=total_bytes,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=f"tokenizing {len(files)} file(s)",
                    disable=not progress,
                ) as bar,
            ):
                for ids, num_bytes in encoded:
                    builder.add_item(torch.from_numpy(ids))
                    builder.end_document()
                    num_documents += 1
                    num_tokens += len(ids)
                    max_token_id = max(max_token_id, int(ids.max()))
                    bar.update(num_bytes)
                bar.update(total_bytes - bar.n)  # separators and skipped lines, not counted above
            if num_documents == 0:
                raise ValueError(
                    f"the corpus {[str(f) for f in files]} has no non-empty document; "
                    "give it some text (.jsonl text is read from --text-key, here "
                    f"{text_key!r})"
                )
            builder.finalize(str(tmp_prefix) + ".idx")
        finally:
            builder.data_file.close()  # finalize closed it already unless a document failed
        meta = {
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "bos_id": tokenizer.bos_id,
            "bos": bos,  # whether every document starts with bos_id
            "num_documents": num_documents,
            "num_tokens": num_tokens,
            "max_token_id": max_token_id,
            "dtype": np.dtype(dtype).name,
            "tokenizer": tokenizer_path,
            "tokenizer_sha256": tokenizer.sha256,  # checked against the job's tokenizer
        }
        meta_path(tmp_prefix).write_text(json.dumps(meta, indent=2) + "\n")
        # The sidecar goes last: a reader that finds it finds the .bin and .idx it describes.
        for suffix in (".bin", ".idx", META_SUFFIX):
            os.replace(str(tmp_prefix) + suffix, str(out_prefix) + suffix)
    return meta


def write_token_dataset(
    out_prefix: str | os.PathLike[str],
    documents: Sequence[Sequence[int]],
    *,
    vocab_size: int,
    eos_id: int = 2,
    bos_id: int = 1,
) -> dict[str, Any]:
    """Write already tokenized documents (each ending as the caller wants, e.g. with eos) as
    `out_prefix`.bin/.idx/.meta.json; returns the sidecar's contents."""
    import torch

    indexed_dataset = megatron_indexed_dataset()
    dtype = indexed_dataset.DType.optimal_dtype(vocab_size)
    builder = indexed_dataset.IndexedDatasetBuilder(f"{out_prefix}.bin", dtype=dtype)
    num_tokens, max_token_id = 0, -1
    for doc in documents:
        builder.add_item(torch.as_tensor(doc, dtype=torch.int64))
        builder.end_document()
        num_tokens += len(doc)
        max_token_id = max(max_token_id, max(doc, default=-1))
    builder.finalize(f"{out_prefix}.idx")
    meta = {
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "bos_id": bos_id,
        "bos": False,
        "num_documents": len(documents),
        "num_tokens": num_tokens,
        "max_token_id": max_token_id,
        "dtype": np.dtype(dtype).name,
        "tokenizer": None,
    }
    meta_path(out_prefix).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


@contextlib.contextmanager
def _encoded(
    documents: Iterator[tuple[str, int]], tokenizer_path: str, *, bos: bool, workers: int
) -> Iterator[Iterator[tuple[np.ndarray, int]]]:
    """(ids, input bytes) of every document, in input order, from `workers` processes."""
    if workers == 1:
        yield map(_Encoder(tokenizer_path, bos), documents)
        return
    # fork where the platform has it: workers start in milliseconds and need not re-import the
    # caller's main module (spawn fails when that is stdin). They run only sentencepiece, which
    # uses none of the parent's torch thread pools.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, bos)) as pool:
        yield pool.imap(_encode_in_worker, documents, chunksize=CHUNKSIZE)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Tokenize .txt/.jsonl corpora into a Megatron indexed dataset "
        "(PREFIX.bin, PREFIX.idx) with a PREFIX.meta.json sidecar."
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help=".txt or .jsonl files, or folders of them (their files are read in sorted order)",
    )
    parser.add_argument(
        "--out", required=True, metavar="PREFIX", help="output prefix, without extension"
    )
    parser.add_argument(
        "--tokenizer", required=True, metavar="MODEL", help="sentencepiece tokenizer.model"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="tokenizer processes (default: one per CPU core)",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="file",
        help=".txt documents: a whole file, or each blank-line-separated paragraph",
    )
    parser.add_argument(
        "--text-key", default="text", metavar="KEY", help="field of .jsonl records to read"
    )
    parser.add_argument(
        "--bos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start every document with BOS, as sampling starts every prompt (default: on)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        meta = prepare_data(
            args.input,
            args.out,
            args.tokenizer,
            workers=args.workers,
            text_key=args.text_key,
            split=args.split,
            bos=args.bos,
            progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}.bin/.idx: {meta['num_documents']} documents, "
        f"{meta['num_tokens']} tokens ({meta['dtype']})"
    )
    return 0
