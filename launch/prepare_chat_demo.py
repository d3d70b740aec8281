"""Prepare the chat demo data: LLaMA-Factory's demo files from the PyPI source distribution
`llamafactory==0.9.5`.

    python launch/prepare_chat_demo.py [--out data/chat_demo]

Downloads the sdist (never installs it) and extracts with tarfile only
`data/alpaca_en_demo.json` (999 Alpaca records, for SFT) and `data/dpo_en_demo.json` (300
ShareGPT preference pairs, for the reward model). Skipped if both files are already there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llama_dist.data.sdist import fetch_sdist_members

SDIST = "llamafactory==0.9.5"
FILES = ("data/alpaca_en_demo.json", "data/dpo_en_demo.json")


def fetch_chat_demo(out: Path, requirement: str = SDIST) -> list[Path]:
    """The demo files in `out`, downloaded and extracted unless already there."""
    paths = [out / Path(f).name for f in FILES]
    if all(p.is_file() for p in paths):
        return paths
    fetch_sdist_members(
        requirement,
        out,
        lambda inner: Path(inner).name if inner in FILES else None,
        required=[p.name for p in paths],
    )
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/chat_demo")
    args = parser.parse_args(argv)
    for path in fetch_chat_demo(Path(args.out)):
        print(f"{path}: {len(json.loads(path.read_text()))} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
