"""The demo's harness tasks, built from the demo corpus and the demo chat data.

    python launch/build_demo_tasks.py   # rewrites tasks/data/demo_*.jsonl

- `demo_shakespeare_next_line` (multiple choice): two lines of a speech from the Shakespeare
  plays of the CPU pretraining demo, then its true next line against three lines of other
  speeches of similar length. A model that learned the plays' language prefers the line
  that follows; chance is 25%.
- `demo_shakespeare_ppl` (rolling loglikelihood): whole speeches, scored as the harness's
  wikitext is (word and byte perplexity, bits per byte).
- `demo_alpaca_choice` (multiple choice, for chat models with --apply_chat_template): an
  instruction of the chat demo's Alpaca data and its reference answer against three answers
  to other instructions. The items come from the demo SFT data itself, so the score shows
  how well a fine-tuned model fits its data, not how it generalises.

Every item is drawn with a fixed seed, so a rebuild from the same files gives the same tasks.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# A speaker's name as the Gutenberg texts write it on its own line: "Ham.", "First Clown.",
# "LADY MACBETH." ...
_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,30}\.$")


def speeches(text: str) -> list[list[str]]:
    """The speeches of a play: blocks separated by blank lines whose first line names the
    speaker, as lists of the lines spoken (stage directions in brackets dropped)."""
    out = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line.strip() for line in block.strip().split("\n")]
        if len(lines) < 2 or not _SPEAKER.match(lines[0]):
            continue
        spoken = [line for line in lines[1:] if line and not line.startswith("[")]
        if spoken:
            out.append(spoken)
    return out


def _distractors(
    rng: random.Random, pool: Sequence[str], answer: str, count: int, *, tries: int = 200
) -> list[str]:
    """`count` distinct lines of `pool` within a third of `answer`'s length (or any, after
    `tries` draws), none equal to it."""
    chosen: list[str] = []
    for attempt in range(tries * count):
        line = rng.choice(pool)
        close = abs(len(line) - len(answer)) <= max(8, len(answer) // 3)
        if line != answer and line not in chosen and (close or attempt >= tries):
            chosen.append(line)
            if len(chosen) == count:
                return chosen
    raise ValueError(f"the pool of {len(pool)} lines has too few distinct lines for {count}")


def shakespeare_tasks(
    texts: Sequence[Path], *, num_choice: int = 100, num_passages: int = 20, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(next-line items, perplexity passages) from the plays in `texts`."""
    all_speeches = [s for path in sorted(texts) for s in speeches(path.read_text("utf-8"))]
    if not all_speeches:
        raise ValueError(
            f"no speeches found in {len(texts)} text(s); pass the demo corpus's plays "
            "(python launch/prepare_demo.py writes them to data/shakespeare/texts)"
        )
    rng = random.Random(seed)
    lines = [line for s in all_speeches for line in s if len(line) >= 20]
    long_enough = [s for s in all_speeches if len(s) >= 3 and all(len(x) >= 20 for x in s[:3])]
    choice_items = []
    for speech in rng.sample(long_enough, min(num_choice, len(long_enough))):
        answer = speech[2]
        choices = [answer, *_distractors(rng, lines, answer, 3)]
        rng.shuffle(choices)
        choice_items.append(
            {"context": "\n".join(speech[:2]), "choices": choices, "label": choices.index(answer)}
        )
    passages = [s for s in all_speeches if 6 <= len(s) <= 30]
    passage_items = [
        {"text": "\n".join(s)} for s in rng.sample(passages, min(num_passages, len(passages)))
    ]
    return choice_items, passage_items


def alpaca_choice_task(
    records: Sequence[dict[str, str]], *, num_items: int = 100, max_chars: int = 300, seed: int = 0
) -> list[dict[str, Any]]:
    """Items of `demo_alpaca_choice` from Alpaca records (instruction, input, output)."""
    usable = [
        r
        for r in records
        if r.get("output") and len(r["output"]) <= max_chars and len(r["instruction"]) <= max_chars
    ]
    if len(usable) < 4:
        raise ValueError(
            f"only {len(usable)} Alpaca records have an output of at most {max_chars} "
            "characters; pass the chat demo's alpaca_en_demo.json "
            "(python launch/prepare_chat_demo.py)"
        )
    rng = random.Random(seed)
    outputs = [r["output"].strip() for r in usable]
    items = []
    for record in rng.sample(usable, min(num_items, len(usable))):
        question = record["instruction"].strip()
        if record.get("input"):
            question += "\n\n" + record["input"].strip()
        answer = record["output"].strip()
        choices = [answer, *_distractors(rng, outputs, answer, 3)]
        rng.shuffle(choices)
        items.append({"question": question, "choices": choices, "label": choices.index(answer)})
    return items


def write_jsonl(path: Path, items: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    return path


def build_demo_tasks(texts: Sequence[Path], alpaca: Path, data_dir: Path) -> list[Path]:
    """Write the three demo tasks' data files into `data_dir` (the YAMLs beside
    `tasks/data` name them)."""
    choice_items, passages = shakespeare_tasks(texts)
    records = json.loads(alpaca.read_text("utf-8"))
    return [
        write_jsonl(data_dir / "demo_shakespeare_next_line.jsonl", choice_items),
        write_jsonl(data_dir / "demo_shakespeare_ppl.jsonl", passages),
        write_jsonl(data_dir / "demo_alpaca_choice.jsonl", alpaca_choice_task(records)),
    ]
