"""Ghost Attention (GAtt) data: multi-turn dialogs whose answers keep following a system
instruction given in the first turn only (llama2.md, "Ghost Attention, GAtt").

Input: dialogs of user messages (the assistant turns are sampled) and an instruction each
(`rlhf.instructions.Instruction`), read from JSONL records

    {"users": [str, ...], "instruction": Instruction.to_json()}   (or "messages": the user
     messages of an SFT dialog, its assistant turns dropped; "instruction" may be left out
     and drawn later with `with_instructions`)

Three steps, as in the paper:

1. `augment`: the instruction is concatenated to every user message (in full: the shortened
   form is for the training sample, as the paper's A.3.5 says).
2. `sample_answers`: the assistant turns are sampled turn by turn from the augmented dialog,
   every dialog of one turn in one call of a responder `respond(dialogs) -> answers` (each
   dialog a message list ending with a user message): `model_responder` over the generation
   engine (`generate`, or `generate_distributed` on a mesh), or a rule-based `RuleResponder`.
3. `build_sample`: the training sample has the instruction in the first user turn only, as
   the system message (which the chat format folds into the first user turn), or with
   placement="prefix" written before the first user message; the record says
   `"train_on": "last"`, so `data.sft` puts the loss on the last assistant turn alone, every
   earlier token (assistant ones included) masked. Such records mix with ordinary SFT data.

Records written (`write_gatt_data`), in the messages layout `launch/sft.py` reads as is:

    {"messages": [{"role": "system", "content": instruction.text},
                  {"role": "user", ...}, {"role": "assistant", ...}, ...],
     "train_on": "last",
     "gatt": {"instruction": Instruction.to_json(), "turn": t, "turns": T}}

With per_turn=True (the default) a dialog of T answered turns gives T samples, the one of
turn t ending at turn t with the history before it: the last-turn loss alone would train only
the final turn of each dialog, so the turns in between would never learn to follow the
instruction. `write_baseline_data` writes the same dialogs as ordinary SFT data instead (no
GAtt): answers sampled with the instruction in the first turn only, loss on every turn.

A stage calls `read_gatt_dialogs` (then `with_instructions` if the file has none), builds a
responder from the latest RLHF model (`model_responder`) and calls `write_gatt_data`; its
output is the SFT job's data file. `write_synthetic_dialogs` and `RuleResponder` make a task
a tiny model learns on CPU.
"""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llama_dist.data.chat import encode_dialog
from llama_dist.data.records import read_records
from llama_dist.data.sft import to_dialog
from llama_dist.rlhf.instructions import (
    EndWith,
    Instruction,
    Rule,
    StartWith,
    apply_rules,
    instruction_from_json,
    known_rules,
    sample_instruction,
)
from llama_dist.tokenizer import Tokenizer

Dialog = list[dict[str, str]]
# Answers to dialogs that each end with a user message, one per dialog, in order.
Responder = Callable[[list[Dialog]], list[str]]
PLACEMENTS = ("system", "prefix")
# Between the instruction and a user message it is concatenated to.
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class GattDialog:
    """The user messages of one dialog and the instruction its answers must follow."""

    users: tuple[str, ...]
    instruction: Instruction | None = None


# Reading ------------------------------------------------------------------------------------
def _users_of(record: Mapping[str, Any]) -> list[str]:
    if "users" in record:
        users = record["users"]
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise ValueError("'users' must be a list of strings (the user messages)")
    else:
        users = [m["content"] for m in to_dialog(dict(record)) if m.get("role") == "user"]
    if not users or not all(u.strip() for u in users):
        raise ValueError("the dialog needs at least one user message, none of them empty")
    return users


def read_gatt_dialogs(path: str | os.PathLike) -> list[GattDialog]:
    """The dialogs of a JSON/JSONL file (layouts in the module docstring)."""
    out = []
    for where, record in read_records(path):
        try:
            if isinstance(record, ValueError):
                raise record
            if not isinstance(record, dict):
                raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
            users = _users_of(record)
            instruction = None
            if record.get("instruction") is not None:
                instruction = instruction_from_json(record["instruction"])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{where}: {e}") from None
        out.append(GattDialog(tuple(users), instruction))
    return out


def write_gatt_dialogs(path: str | os.PathLike, dialogs: Sequence[GattDialog]) -> Path:
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for d in dialogs:
            record: dict[str, Any] = {"users": list(d.users)}
            if d.instruction is not None:
                record["instruction"] = d.instruction.to_json()
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def with_instructions(
    dialogs: Sequence[GattDialog], rng: random.Random, **sample_kw: Any
) -> list[GattDialog]:
    """`dialogs`, those without an instruction given one by `sample_instruction(rng,
    **sample_kw)`."""
    return [
        d if d.instruction else GattDialog(d.users, sample_instruction(rng, **sample_kw))
        for d in dialogs
    ]


def _instruction(d: GattDialog) -> Instruction:
    if d.instruction is None:
        raise ValueError(
            f"dialog {list(d.users)[:1]}... has no instruction; draw them with with_instructions"
        )
    return d.instruction


# The three steps ----------------------------------------------------------------------------
def augment(users: Sequence[str], instruction: str) -> list[str]:
    """Every user message with the instruction concatenated before it (step 1)."""
    return [f"{instruction}{SEPARATOR}{u}" for u in users]


def conversation(
    users: Sequence[str],
    answers: Sequence[str],
    *,
    system: str | None = None,
    placement: str = "system",
) -> Dialog:
    """Messages of `users` interleaved with `answers` (as many, or one fewer: the dialog then
    ends with a user message to answer), with `system` in the first user turn: as the system
    message, or (placement="prefix") written before the first user message."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} must be one of {PLACEMENTS}")
    if len(answers) not in (len(users), len(users) - 1):
        raise ValueError(f"{len(answers)} answers for {len(users)} user messages")
    users = list(users)
    messages: Dialog = []
    if system is not None and placement == "system":
        messages.append({"role": "system", "content": system})
    elif system is not None:
        users[0] = f"{system}{SEPARATOR}{users[0]}"
    for i, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def max_turns(dialogs: Sequence[GattDialog]) -> int:
    return max((len(d.users) for d in dialogs), default=0)


def sample_answers(
    dialogs: Sequence[GattDialog],
    respond: Responder,
    *,
    augmented: bool = True,
    placement: str = "system",
    num_turns: int | None = None,
) -> list[list[str]]:
    """The assistant turns of every dialog, sampled turn by turn (step 2).

    augmented: the responder sees the instruction (in full) before every user message, as
    GAtt samples; otherwise it sees it once, in the first turn (`instruction.text` placed as
    `placement` says), as a user would give it. Dialogs run for up to `num_turns` turns
    (default: the longest dialog's); `respond` is called once per turn with the dialogs still
    running, even none, so that ranks sampling together on a mesh (each with its own dialogs
    and the same `num_turns`) call it equally often. A dialog whose answer comes back empty
    ends before that turn.
    """
    num_turns = max_turns(dialogs) if num_turns is None else num_turns
    answers: list[list[str]] = [[] for _ in dialogs]
    running = [True] * len(dialogs)
    for t in range(num_turns):
        active = [i for i, d in enumerate(dialogs) if running[i] and len(d.users) > t]
        views = []
        for i in active:
            d, instruction = dialogs[i], _instruction(dialogs[i])
            if augmented:
                views.append(
                    conversation(augment(d.users[: t + 1], instruction.full_text), answers[i])
                )
            else:
                users = d.users[: t + 1]
                views.append(
                    conversation(users, answers[i], system=instruction.text, placement=placement)
                )
        replies = respond(views)
        if len(replies) != len(views):
            raise ValueError(f"the responder gave {len(replies)} answers to {len(views)} dialogs")
        for i, reply in zip(active, replies, strict=True):
            reply = reply.strip()
            if reply:
                answers[i].append(reply)
            else:
                running[i] = False
    return answers


def build_sample(
    users: Sequence[str], answers: Sequence[str], instruction: str, *, placement: str = "system"
) -> dict[str, Any]:
    """The SFT record of one GAtt sample (step 3): the instruction in the first user turn
    only, the loss on the last assistant turn only ("train_on": "last", read by data.sft)."""
    if not answers or len(answers) != len(users):
        raise ValueError(f"a GAtt sample needs one answer per user message ({len(users)})")
    messages = conversation(users, answers, system=instruction, placement=placement)
    return {"messages": messages, "train_on": "last"}


def build_records(
    dialogs: Sequence[GattDialog],
    answers: Sequence[Sequence[str]],
    *,
    per_turn: bool = True,
    placement: str = "system",
) -> list[dict[str, Any]]:
    """The GAtt records of sampled dialogs: per_turn, one per answered turn t (turns 1..t,
    trained on turn t); otherwise one per dialog, trained on its last answered turn."""
    records = []
    for d, said in zip(dialogs, answers, strict=True):
        instruction, num = _instruction(d), len(said)
        ends = range(1, num + 1) if per_turn else range(num, num + 1) if num else range(0)
        for t in ends:
            record = build_sample(d.users[:t], said[:t], instruction.text, placement=placement)
            record["gatt"] = {"instruction": instruction.to_json(), "turn": t, "turns": num}
            records.append(record)
    return records


def baseline_records(
    dialogs: Sequence[GattDialog],
    answers: Sequence[Sequence[str]],
    *,
    placement: str = "system",
) -> list[dict[str, Any]]:
    """Ordinary SFT records of the same dialogs (no GAtt): the instruction in the first turn,
    every answered turn trained on."""
    records = []
    for d, said in zip(dialogs, answers, strict=True):
        if not said:
            continue
        instruction = _instruction(d)
        messages = conversation(
            d.users[: len(said)], said, system=instruction.text, placement=placement
        )
        records.append(
            {
                "messages": messages,
                "train_on": "all",
                "gatt": {
                    "instruction": instruction.to_json(),
                    "turn": len(said),
                    "turns": len(said),
                },
            }
        )
    return records


def data_summary(
    dialogs: Sequence[GattDialog], answers: Sequence[Sequence[str]], records: list[dict]
) -> dict[str, Any]:
    """Counts of built data: dialogs, records, answers, dialogs cut short, and the checkable
    answers that follow their instruction."""
    checked = followed = 0
    for d, said in zip(dialogs, answers, strict=True):
        instruction = _instruction(d)
        if instruction.checks:
            checked += len(said)
            followed += sum(instruction.check(a) for a in said)
    return {
        "dialogs": len(dialogs),
        "records": len(records),
        "answers": sum(len(a) for a in answers),
        # Answered fewer turns than they have: an empty answer, or num_turns reached.
        "dialogs_cut_short": sum(
            len(a) < len(d.users) for d, a in zip(dialogs, answers, strict=True)
        ),
        "checked_answers": checked,
        "checked_answers_followed": followed,
    }


def _write_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_gatt_data(
    path: str | os.PathLike,
    dialogs: Sequence[GattDialog],
    respond: Responder,
    *,
    per_turn: bool = True,
    placement: str = "system",
    num_turns: int | None = None,
) -> dict[str, Any]:
    """Sample the dialogs' answers with the instruction in every user turn and write their
    GAtt records to `path` (JSONL); returns counts, including how many sampled answers of
    instructions with checks pass them."""
    answers = sample_answers(dialogs, respond, augmented=True, num_turns=num_turns)
    records = build_records(dialogs, answers, per_turn=per_turn, placement=placement)
    _write_jsonl(path, records)
    return data_summary(dialogs, answers, records)


def write_baseline_data(
    path: str | os.PathLike,
    dialogs: Sequence[GattDialog],
    respond: Responder,
    *,
    placement: str = "system",
    num_turns: int | None = None,
) -> dict[str, Any]:
    """The no-GAtt counterpart of `write_gatt_data`: answers sampled with the instruction in
    the first turn only, written as ordinary SFT records trained on every turn."""
    answers = sample_answers(
        dialogs, respond, augmented=False, placement=placement, num_turns=num_turns
    )
    records = baseline_records(dialogs, answers, placement=placement)
    _write_jsonl(path, records)
    return data_summary(dialogs, answers, records)


# Responders ---------------------------------------------------------------------------------
def answer_text(tokenizer: Tokenizer, tokens: Sequence[int]) -> str:
    """Generated tokens as an answer: cut at eos, decoded, stripped."""
    tokens = list(tokens)
    if tokenizer.eos_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_id)]
    return tokenizer.decode(tokens).strip()


def model_responder(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    micro_batch: int = 16,
    mesh: Any = None,
) -> Responder:
    """A responder sampling from `model` (a `Llama`) with the chat format, the dialogs of one
    call generated in batches of `micro_batch` (`generate`). With a `mesh` (a sharded model,
    or its `consolidated_for_generation` copy), every rank calls it together with its own
    dialogs and each call is one `generate_distributed`. Call k draws from a generator
    seeded by (seed, k), so a rerun samples the same answers. A dialog too long for the
    model's max_seq_len with max_new_tokens is a ValueError from `generate`."""
    device = next(model.parameters()).device
    calls = [0]

    def respond(dialogs: list[Dialog]) -> list[str]:
        prompts = [encode_dialog(tokenizer, d).ids for d in dialogs]
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + calls[0])
        calls[0] += 1
        kw = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_id=tokenizer.eos_id,
            generator=generator,
        )
        if mesh is not None:
            from llama_dist.generation_dist import generate_distributed

            outputs = generate_distributed(model, prompts, mesh=mesh, **kw)
        else:
            from llama_dist.generate import generate

            outputs = []
            for i in range(0, len(prompts), micro_batch):
                outputs += generate(model, prompts[i : i + micro_batch], **kw)
        return [answer_text(tokenizer, tokens) for tokens in outputs[: len(prompts)]]

    return respond


def repeat_answer(user: str) -> str:
    """The synthetic task's answer to a user message: the words after its last "repeat:"."""
    at = user.rfind("repeat:")
    return user[at:].removeprefix("repeat:").strip() if at >= 0 else user.strip()


class RuleResponder:
    """A rule-based responder: answers with `base(last user message)` and makes the answer
    follow every rule of `rules` (default: every rule of the instruction lists and of the
    synthetic task) whose text, full or short, it sees.

    follow="turn": it sees the last user message only (and the system message while in the
    first turn, where the chat format puts it): it follows an instruction while the
    instruction is concatenated to the turn, as a model without GAtt. follow="dialog": it
    sees every user and system message so far, as a model that never forgets the
    instruction. follow="never" ignores instructions.
    """

    FOLLOW = ("turn", "dialog", "never")

    def __init__(
        self,
        *,
        follow: str = "turn",
        rules: Sequence[Rule] | None = None,
        base: Callable[[str], str] = repeat_answer,
    ) -> None:
        if follow not in self.FOLLOW:
            raise ValueError(f"follow={follow!r} must be one of {self.FOLLOW}")
        self.follow = follow
        if rules is None:
            rules = list(dict.fromkeys(known_rules() + synthetic_rules()))
        self.rules = list(rules)
        self.base = base

    def seen(self, dialog: Dialog) -> list[Rule]:
        """The rules whose text the responder sees in `dialog`."""
        if self.follow == "never":
            return []
        users = [m["content"] for m in dialog if m["role"] == "user"]
        system = [m["content"] for m in dialog if m["role"] == "system"]
        visible = [*system, *users] if self.follow == "dialog" else users[-1:]
        if self.follow == "turn" and len(users) == 1:
            visible += system
        text = "\n".join(visible)
        return [r for r in self.rules if r.text in text or r.short in text]

    def answer(self, dialog: Dialog) -> str:
        users = [m["content"] for m in dialog if m["role"] == "user"]
        return apply_rules(self.seen(dialog), self.base(users[-1]))

    def __call__(self, dialogs: list[Dialog]) -> list[str]:
        return [self.answer(d) for d in dialogs]


# The synthetic task -------------------------------------------------------------------------
# User messages are "repeat: w1 w2 ..." of these words and the answer repeats them; the
# instruction is one opening or closing word, none of them among the repeated words, so an
# answer never follows it by chance.
SYNTHETIC_WORDS = ("the", "cat", "sat", "on", "a", "mat", "dog", "ran", "big", "red", "sun", "sky")
SYNTHETIC_START_WORDS = ("okay", "so")
SYNTHETIC_END_WORDS = ("ciao", "amigo")


def synthetic_pool() -> dict[str, list[Rule]]:
    """The instruction pool of the synthetic task: category -> rules."""
    return {
        "opening": [StartWith(w) for w in SYNTHETIC_START_WORDS],
        "closing": [EndWith(w) for w in SYNTHETIC_END_WORDS],
    }


def synthetic_rules() -> list[Rule]:
    return [r for rules in synthetic_pool().values() for r in rules]


def synthetic_words() -> list[str]:
    """Every word the synthetic task's text uses (repeated words and instruction words, without
    punctuation), for training a tokenizer that covers it."""
    words = set(SYNTHETIC_WORDS) | {"repeat"}
    for rule in synthetic_rules():
        words |= {w.strip(string.punctuation) for w in f"{rule.text} {rule.short}".split()}
    return sorted(words)


def write_synthetic_dialogs(
    path: str | os.PathLike,
    n: int,
    turns: int,
    seed: int,
    *,
    words_per_turn: tuple[int, int] = (2, 4),
    max_constraints: int = 1,
    short_prob: float = 0.5,
) -> Path:
    """Write `n` synthetic dialogs of `turns` user messages "repeat: ..." with an instruction
    each (a start or end word, shortened with probability `short_prob`), as
    `read_gatt_dialogs` reads them. Deterministic in `seed`."""
    if n < 1 or turns < 1:
        raise ValueError(f"n={n} and turns={turns} must be >= 1")
    lo, hi = words_per_turn
    if not 1 <= lo <= hi:
        raise ValueError(f"words_per_turn={words_per_turn} must be (lo, hi) with 1 <= lo <= hi")
    rng = random.Random(seed)
    dialogs = []
    for _ in range(n):
        instruction = sample_instruction(
            rng,
            max_constraints=max_constraints,
            require_check=True,
            short_prob=short_prob,
            pool=synthetic_pool(),
        )
        users = tuple(
            "repeat: " + " ".join(rng.choice(SYNTHETIC_WORDS) for _ in range(rng.randint(lo, hi)))
            for _ in range(turns)
        )
        dialogs.append(GattDialog(users, instruction))
    return write_gatt_dialogs(path, dialogs)
