"""Prepare the chat demo data: LLaMA-Factory's demo files from the PyPI source distribution
`llamafactory==0.9.5`.

    python launch/prepare_chat_demo.py [--out data/chat_demo] [--prompts 32]

Downloads the sdist (never installs it) and extracts with tarfile only
`data/alpaca_en_demo.json` (999 Alpaca records, for SFT) and `data/dpo_en_demo.json` (300
ShareGPT preference pairs, for the reward model). Skipped if both files are already there.
With --prompts N it also writes `prompts.jsonl`: the N shortest prompts of the preference
pairs, for rejection sampling and PPO on CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llama_dist.data.prompts import parse_prompt
from llama_dist.data.records import read_records
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


def write_prompts(pairs: Path, out: Path, count: int) -> Path:
    """The `count` shortest prompts of a preference file as {"prompt": [messages]} records."""
    dialogs = [parse_prompt(record)[0] for _, record in read_records(pairs)]
    dialogs.sort(key=lambda d: sum(len(m["content"]) for m in d))
    lines = [json.dumps({"prompt": d}, ensure_ascii=False) + "\n" for d in dialogs[:count]]
    out.write_text("".join(lines), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/chat_demo")
    parser.add_argument("--prompts", type=int, default=0, help="also write N RLHF prompts")
    args = parser.parse_args(argv)
    paths = fetch_chat_demo(Path(args.out))
    for path in paths:
        print(f"{path}: {len(json.loads(path.read_text()))} records")
    if args.prompts:
        out = write_prompts(paths[1], Path(args.out) / "prompts.jsonl", args.prompts)
        print(f"{out}: {args.prompts} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
