"""Prompt sets for sampling (rejection sampling, PPO): dialogs that end with a user message.

A record is one of (detected per record):
    {"prompt": str | [{"role", "content"}, ...], "system": str (optional),
     "safety_tagged": bool (optional: the prompt belongs to the safety set),
     "risk_category": str (optional: the kind of risk of an adversarial prompt, e.g.
        "illicit_criminal_activities"; safety context distillation picks its answer
        template by it, the safety evaluation reports per category)}
    a preference record (prompt/chosen/rejected or ShareGPT conversations/chosen/rejected):
        its prompt
    an SFT record (messages, Alpaca, ShareGPT conversations): the dialog without its final
        assistant turn
Every prompt gets a key, a hash of its rendered dialog, so that samples of several iterations
and runs of the same prompt can be matched whatever the order of the files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_dist.data.preference import prompt_dialog
from llama_dist.data.records import read_records
from llama_dist.data.sft import to_dialog


@dataclass(frozen=True)
class Prompt:
    key: str  # hash of the dialog: the same prompt has the same key in every file and run
    dialog: list[dict[str, str]]  # ends with a user message
    safety_tagged: bool
    where: str  # file and line
    risk_category: str | None = None  # the record's "risk_category", if any


def prompt_key(dialog: Sequence[Mapping[str, str]]) -> str:
    text = json.dumps([[m["role"], m["content"]] for m in dialog], ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def parse_prompt(record: Any) -> tuple[list[dict[str, str]], bool]:
    """(dialog ending with a user message, safety_tagged) of a record of any layout above."""
    if not isinstance(record, Mapping):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if "prompt" in record or ("conversations" in record and "chosen" in record):
        dialog = prompt_dialog(record)
    else:
        dialog = to_dialog(record)
        if dialog and dialog[-1]["role"] == "assistant":
            dialog = dialog[:-1]
        if not dialog or dialog[-1]["role"] != "user":
            raise ValueError(
                "the dialog must end with a user message (or a user message and "
                "the assistant's answer, which is dropped)"
            )
    tagged = record.get("safety_tagged", False)
    if not isinstance(tagged, bool):
        raise ValueError(f"'safety_tagged' must be true, false or absent, got {tagged!r}")
    return dialog, tagged


def read_prompts(paths: Sequence[str | os.PathLike], *, skip_invalid: bool = False) -> list[Prompt]:
    """The prompts of JSON/JSONL files, in order, each prompt once (a repeat is left out).
    A malformed record is a ValueError naming its file and line, or skipped with
    `skip_invalid`."""
    if not paths:
        raise ValueError("no prompt files given; pass JSON or JSONL paths")
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"prompt file {path} does not exist")
        for where, record in read_records(path):
            try:
                if isinstance(record, ValueError):
                    raise record
                dialog, tagged = parse_prompt(record)
                category = record.get("risk_category")
                if category is not None and not (isinstance(category, str) and category):
                    raise ValueError(
                        f"'risk_category' must be a non-empty string or absent, got {category!r}"
                    )
            except ValueError as e:
                if skip_invalid:
                    continue
                raise ValueError(
                    f"{where}: {e} (fix the record, or set skip_invalid to skip it)"
                ) from None
            key = prompt_key(dialog)
            if key not in seen:
                seen.add(key)
                prompts.append(Prompt(key, dialog, tagged, where, category))
    if not prompts:
        raise ValueError(f"no usable prompts in {[str(p) for p in paths]}")
    return prompts
