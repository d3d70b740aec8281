"""Llama 2 tokenizer: a SentencePiece BPE model, used through sentencepiece directly.

`Tokenizer` loads any file with Llama 2's layout (unk 0, bos 1, eos 2, no pad, digits split,
byte fallback); `train_tokenizer` trains a new one with the settings of Meta's released
`tokenizer.model` (see ../shared/docs/llama2.md, "Architecture"). transformers is not used:
its Llama tokenizers differ from sentencepiece on runs of leading spaces.

Command line: `python launch/train_tokenizer.py --input corpus.txt --out tok/tokenizer.model
--vocab-size 8000`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

# Byte fallback reserves one piece per byte value, next to unk, bos and eos.
NUM_BYTE_PIECES = 256
NUM_SPECIAL_PIECES = 3

# Trainer and normalizer settings of Meta's Llama 2 `tokenizer.model`, as read back from its
# trainer_spec and normalizer_spec. Paths, sizes and thread counts are arguments instead.
LLAMA2_TRAINER_SETTINGS: dict[str, Any] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "allow_whitespace_only_pieces": True,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "character_coverage": 0.99995,
    "max_sentencepiece_length": 16,
    "max_sentence_length": 4192,
    "shuffle_input_sentence": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "unk_surface": " \u2047 ",
}


class Tokenizer:
    """Encode and decode text with a Llama-2-layout SentencePiece model file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(
                f"tokenizer model {str(self.path)!r} does not exist; point to a Llama 2 "
                "tokenizer.model, or train one with llama_dist.tokenizer.train_tokenizer "
                "(python launch/train_tokenizer.py --input corpus.txt --out "
                f"{self.path} --vocab-size 8000)"
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"{str(self.path)!r} is not a SentencePiece model ({e}); pass the binary "
                "tokenizer.model file, not tokenizer.json or another text file"
            ) from e
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"{str(self.path)!r} has no bos or eos piece (bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}); Llama 2 needs both, train one with train_tokenizer"
            )
        serialized = self._sp.serialized_model_proto()
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(serialized)
        self._trainer_spec = proto.trainer_spec
        # The model's identity, whatever its file is called or where it lies.
        self.sha256 = hashlib.sha256(serialized).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int | None:
        """None for Llama 2, which has no pad piece (sentencepiece reports -1)."""
        pad = self._sp.pad_id()
        return None if pad < 0 else pad

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def byte_fallback(self) -> bool:
        """Whether characters outside the vocabulary become `<0x..>` byte pieces, not unk."""
        return self._trainer_spec.byte_fallback

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        # sentencepiece would silently encode a list as a batch and return a list of lists.
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__}; use encode_batch")
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        bos: bool = True,
        eos: bool = False,
        num_threads: int | None = None,
    ) -> list[list[int]]:
        """Encode many texts in sentencepiece's thread pool (None: its default thread count)."""
        return self._sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Sequence[int] | Any) -> str:
        """Text of a list of ids or a 1-D tensor/array of ids."""
        if hasattr(ids, "tolist"):
            if ids.ndim != 1:
                raise ValueError(
                    f"decode takes a 1-D sequence of ids, got shape {tuple(ids.shape)}; "
                    "decode each row separately"
                )
            ids = ids.tolist()
        return self._sp.decode(list(ids))

    def id_to_piece(self, id: int) -> str:
        return self._sp.id_to_piece(id)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def train_tokenizer(
    input_files: Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    vocab_size: int,
    num_threads: int | None = None,
    input_sentence_size: int = 10_000_000,
    seed: int = 0,
) -> Path:
    """Train a Llama-2-style BPE model on plain-text files and write it to `out_path`.

    Lines are the training sentences. `input_sentence_size` caps how many of them are
    sampled (sentencepiece holds every sampled line in memory; Meta used 200M); 0 reads all.
    The `.model` and a `.vocab` listing next to it are written whole or not at all.
    Returns the path of the `.model` file.
    """
    min_vocab = NUM_BYTE_PIECES + NUM_SPECIAL_PIECES + 1
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback alone takes "
            f"{NUM_BYTE_PIECES} + {NUM_SPECIAL_PIECES} special pieces; use vocab_size >= "
            f"{min_vocab} (Llama 2 uses 32000)"
        )
    if not input_files:
        raise ValueError("no input files given; pass one or more plain-text corpus files")
    inputs = [Path(f) for f in input_files]
    missing = [str(f) for f in inputs if not f.is_file()]
    if missing:
        raise ValueError(f"input files {missing} do not exist or are not files")
    if all(f.stat().st_size == 0 for f in inputs):
        raise ValueError(f"the corpus {[str(f) for f in inputs]} is empty; give it some text")
    out_path = Path(out_path)
    if out_path.suffix != ".model":
        raise ValueError(
            f"out_path {str(out_path)!r} must name the .model file to write, "
            "e.g. tok/tokenizer.model"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    num_threads = num_threads or os.cpu_count() or 1

    # Trained in a temporary folder beside the output, so the final moves are renames on one
    # file system and a failed or interrupted run leaves no partial model behind.
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".tokenizer-") as tmp:
        prefix = Path(tmp) / out_path.stem
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                input=[str(f) for f in inputs],
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                num_threads=num_threads,
                input_sentence_size=input_sentence_size,
                minloglevel=2,  # errors still raise; the per-step progress log is noise
                **LLAMA2_TRAINER_SETTINGS,
            )
        except RuntimeError as e:
            raise _training_error(e, vocab_size) from e
        os.replace(prefix.with_suffix(".vocab"), out_path.with_suffix(".vocab"))
        os.replace(prefix.with_suffix(".model"), out_path)
    return out_path


def _training_error(e: RuntimeError, vocab_size: int) -> ValueError:
    """A ValueError that says how to fix the corpus or vocab_size sentencepiece refused."""
    message = str(e)
    if "Vocabulary size too high" in message:
        return ValueError(
            f"the corpus is too small for vocab_size={vocab_size} ({message}); "
            "lower vocab_size or give more text"
        )
    if "smaller than required_chars" in message:
        return ValueError(
            f"vocab_size={vocab_size} cannot hold every character of the corpus plus the byte "
            f"pieces ({message}); raise vocab_size"
        )
    if "sentences_.empty()" in message:
        return ValueError("the corpus has no non-empty lines; give it some text")
    return ValueError(f"sentencepiece could not train on this corpus: {message}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a Llama-2-style SentencePiece BPE tokenizer on plain-text files."
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="plain-text corpus files, one sentence or paragraph a line",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the .model file to write (a .vocab listing goes beside it)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help="number of pieces, including 256 byte pieces and unk/bos/eos",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="trainer threads (default: all CPU cores)",
    )
    args = parser.parse_args(argv)
    try:
        path = train_tokenizer(
            args.input, args.out, vocab_size=args.vocab_size, num_threads=args.threads
        )
    except ValueError as e:
        parser.error(str(e))
    tokenizer = Tokenizer(path)
    print(f"wrote {path} ({tokenizer.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
