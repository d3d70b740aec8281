"""Pairwise preference data for reward models: pairs read from JSON/JSONL, tokenised on load.

A record is one comparison of two responses to the same prompt, in one of two layouts
(detected per record; a file may mix them):

    {"prompt": str | [{"role": "system" | "user" | "assistant", "content": str}, ...],
     "chosen": str, "rejected": str,
     "rating": "significantly better" | "better" | "slightly better" | "negligibly better"
               | "unsure" (optional; see rlhf.ranking.canonical_rating for the spellings),
     "chosen_safe": bool, "rejected_safe": bool (optional: Safety RM labels),
     "safety_tagged": bool (optional: the prompt belongs to the safety set),
     "system": str (optional, with a string prompt)}

    {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...],
     "chosen": {"from": "gpt", "value": str}, "rejected": {"from": "gpt", "value": str}}
     (ShareGPT preference records as LLaMA-Factory's dpo_en_demo.json has them; the optional
     keys above are read too)

A message-list prompt is a dialog ending with a user message. Prompt plus response is rendered
with the Llama 2 chat template (`data.chat.encode_dialog`), the response being the final
assistant turn, so each sequence ends with the response's eos: the token the reward is read at.

Pairs longer than `max_len` tokens are truncated or dropped, and counted (`PreferenceSummary`,
also logged). Truncation never cuts a response: it cuts the prompt, by the same amount for both
responses so that they are still compared on the same visible context, keeping bos and the END
of the prompt (the last user message and the `[/INST]` the response answers). A pair whose
longer response leaves fewer than `min_prompt_tokens` prompt tokens is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama_dist.data.chat import encode_dialog
from llama_dist.data.records import read_records
from llama_dist.data.sft import OVERLONG, to_dialog

# Pad with the id exported reward models name as pad_token_id, so that transformers finds the
# same last tokens in our batches.
from llama_dist.models.hf_adapter import PAD_ID
from llama_dist.rlhf.ranking import RATINGS, UNRATED, canonical_rating
from llama_dist.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_ASSISTANT_FROM = ("gpt", "assistant", "model")
_OPTIONAL_BOOLS = ("chosen_safe", "rejected_safe", "safety_tagged")


@dataclass(frozen=True)
class PreferencePair:
    """One comparison, tokenised: prompt + chosen and prompt + rejected, each ending in eos."""

    chosen: list[int]
    rejected: list[int]
    prompt_len: int  # leading tokens the two share (the rendered prompt, after truncation)
    rating: str | None  # one of rlhf.ranking.RATINGS, or None when the record has none
    chosen_safe: bool | None
    rejected_safe: bool | None
    safety_tagged: bool | None
    where: str  # file and line (JSONL) or record index (JSON)


@dataclass
class PreferenceSummary:
    """What loading did to the records: every pair left out or changed is counted here."""

    files: list[str] = field(default_factory=list)
    records: int = 0  # records read (valid or not)
    pairs: int = 0  # pairs kept
    truncated: int = 0  # kept with their prompt shortened to fit max_len
    dropped_overlong: int = 0  # longer than max_len, with overlong="drop"
    dropped_response_too_long: int = 0  # truncating the prompt would leave too little of it
    skipped_invalid: int = 0  # malformed records left out (skip_invalid=True)
    skipped: list[str] = field(default_factory=list)  # "where: why" of each skipped record
    ratings: dict[str, int] = field(default_factory=dict)  # kept pairs per bucket / "unrated"

    def __str__(self) -> str:
        return (
            f"{self.pairs} preference pairs from {self.records} records in {len(self.files)} "
            f"files: {self.truncated} truncated, {self.dropped_overlong} dropped as too long, "
            f"{self.dropped_response_too_long} dropped (response too long to keep a prompt), "
            f"{self.skipped_invalid} invalid skipped; ratings {self.ratings}"
        )


# Reading ----------------------------------------------------------------------------------------
def _response(record: Mapping[str, Any], key: str) -> str:
    if key not in record:
        raise ValueError(f"the record has no {key!r} response")
    value = record[key]
    if isinstance(value, Mapping):  # ShareGPT: {"from": "gpt", "value": ...}
        if value.get("from") not in _ASSISTANT_FROM or "value" not in value:
            raise ValueError(
                f"{key!r} must be {{'from': 'gpt', 'value': str}} (from one of "
                f"{list(_ASSISTANT_FROM)}), got {value!r}"
            )
        value = value["value"]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{key!r} is an empty response")
    return value


def prompt_dialog(record: Mapping[str, Any]) -> list[dict[str, str]]:
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"'system' must be a string, got {type(system).__name__}")
    if "conversations" in record:
        dialog = to_dialog({"conversations": record["conversations"], "system": system}, "sharegpt")
    elif "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("'prompt' is empty")
            dialog = [{"role": "user", "content": prompt}]
            if system:
                dialog.insert(0, {"role": "system", "content": system})
        elif isinstance(prompt, list):
            if system is not None:
                raise ValueError(
                    "give the system message either as 'system' or inside the 'prompt' list, "
                    "not both"
                )
            dialog = [dict(m) if isinstance(m, Mapping) else m for m in prompt]
        else:
            raise ValueError(
                f"'prompt' must be a string or a list of {{role, content}} messages, got "
                f"{type(prompt).__name__}"
            )
    else:
        raise ValueError(
            f"record of unknown layout (keys {sorted(record)}); expected 'prompt', 'chosen', "
            "'rejected' or ShareGPT 'conversations', 'chosen', 'rejected'"
        )
    for i, message in enumerate(dialog):
        if not isinstance(message, Mapping) or not {"role", "content"} <= message.keys():
            raise ValueError(
                f"prompt message {i} must be a dict with the keys 'role' and 'content', got "
                f"{message!r}"
            )
    if not dialog or dialog[-1]["role"] != "user":
        raise ValueError(
            "the prompt must end with a user message (the responses answer it); got "
            f"{dialog[-1] if dialog else 'no message'!r}"
        )
    return dialog


@dataclass(frozen=True)
class _Record:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    rating: str | None
    labels: dict[str, bool | None]


def parse_record(record: Any) -> _Record:
    """A record of either layout, checked; ValueError saying what is wrong."""
    if not isinstance(record, Mapping):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    prompt = prompt_dialog(record)
    chosen, rejected = _response(record, "chosen"), _response(record, "rejected")
    if chosen.strip() == rejected.strip():
        raise ValueError("'chosen' and 'rejected' are the same response; a pair must differ")
    rating = record.get("rating")
    rating = None if rating is None else canonical_rating(rating)
    labels = {}
    for key in _OPTIONAL_BOOLS:
        value = record.get(key)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{key!r} must be true, false or absent, got {value!r}")
        labels[key] = value
    return _Record(prompt, chosen, rejected, rating, labels)


# Tokenising -------------------------------------------------------------------------------------
def _encode(tokenizer: Tokenizer, prompt: list[dict[str, str]], response: str):
    tokens = encode_dialog(tokenizer, [*prompt, {"role": "assistant", "content": response}])
    last_turn = tokens.turns[-1]
    # The response begins at the first answer token of the last turn.
    start = next(
        i
        for i, (turn, answer) in enumerate(zip(tokens.turns, tokens.answer_mask, strict=True))
        if turn == last_turn and answer
    )
    return tokens.ids, start


class PreferenceDataset(torch.utils.data.Dataset):
    """Preference pairs of JSON/JSONL files, tokenised once on load; item i is a
    `PreferencePair`. `summary` counts what was truncated, dropped and skipped.

    max_len: most tokens of one sequence (prompt + response); overlong: "truncate" (the
    prompt's start, see the module docstring) or "drop"; min_prompt_tokens: fewest prompt
    tokens (bos included) a truncated pair keeps, else it is dropped; skip_invalid: leave out
    malformed records (counted, listed in `summary.skipped`) instead of raising a ValueError
    that names the file and line.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        tokenizer: Tokenizer,
        *,
        max_len: int,
        overlong: str = "truncate",
        min_prompt_tokens: int = 16,
        skip_invalid: bool = False,
    ) -> None:
        if overlong not in OVERLONG:
            raise ValueError(f"overlong={overlong!r} must be one of {OVERLONG}")
        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len={max_len!r} must be an integer >= 2")
        if not 1 <= min_prompt_tokens < max_len:
            raise ValueError(
                f"min_prompt_tokens={min_prompt_tokens} must be in [1, max_len={max_len})"
            )
        if not paths:
            raise ValueError("no preference files given; pass JSON or JSONL paths")
        self.max_len = max_len
        self.overlong = overlong
        self.min_prompt_tokens = min_prompt_tokens
        self.summary = PreferenceSummary()
        self.pairs: list[PreferencePair] = []
        for path in paths:
            self._load_file(Path(path), tokenizer, skip_invalid)
        ratings = Counter(p.rating or "unrated" for p in self.pairs)
        self.summary.ratings = {r: ratings[r] for r in (*RATINGS, "unrated") if ratings[r]}
        self.summary.pairs = len(self.pairs)
        if not self.pairs:
            raise ValueError(
                f"no usable preference pairs in {[str(p) for p in paths]} ({self.summary}); "
                "check the files' layout, max_len and overlong"
            )
        changed = (
            self.summary.truncated
            + self.summary.dropped_overlong
            + self.summary.dropped_response_too_long
            + self.summary.skipped_invalid
        )
        (log.warning if changed else log.info)("%s", self.summary)

    def _load_file(self, path: Path, tokenizer: Tokenizer, skip_invalid: bool) -> None:
        if not path.is_file():
            raise ValueError(f"preference file {path} does not exist")
        self.summary.files.append(str(path))
        kept_before, records_before = len(self.pairs), self.summary.records
        for where, record in read_records(path):
            self.summary.records += 1
            try:
                if isinstance(record, ValueError):
                    raise record
                parsed = parse_record(record)
                chosen, start_c = _encode(tokenizer, parsed.prompt, parsed.chosen)
                rejected, start_r = _encode(tokenizer, parsed.prompt, parsed.rejected)
            except ValueError as e:
                if not skip_invalid:
                    raise ValueError(
                        f"{where}: {e} (fix the record, or pass skip_invalid=True to skip "
                        "malformed records)"
                    ) from None
                self.summary.skipped_invalid += 1
                self.summary.skipped.append(f"{where}: {e}")
                continue
            # Both render the same prompt segments, encoded as prefixes of their last segment.
            assert start_c == start_r and chosen[:start_c] == rejected[:start_r], where
            pair = self._fit(chosen, rejected, start_c)
            if pair is None:
                continue
            chosen, rejected, prompt_len = pair
            self.pairs.append(
                PreferencePair(
                    chosen=chosen,
                    rejected=rejected,
                    prompt_len=prompt_len,
                    rating=parsed.rating,
                    chosen_safe=parsed.labels["chosen_safe"],
                    rejected_safe=parsed.labels["rejected_safe"],
                    safety_tagged=parsed.labels["safety_tagged"],
                    where=where,
                )
            )
        if len(self.pairs) == kept_before and self.summary.records > records_before:
            raise ValueError(
                f"{path}: none of its {self.summary.records - records_before} records gave a "
                f"pair ({self.summary.skipped[-1] if self.summary.skipped else 'all too long'}); "
                "is it a preference file (prompt/chosen/rejected or ShareGPT "
                "conversations/chosen/rejected)?"
            )

    def _fit(self, chosen: list[int], rejected: list[int], prompt_len: int):
        longest = max(len(chosen), len(rejected))
        if longest <= self.max_len:
            return chosen, rejected, prompt_len
        if self.overlong == "drop":
            self.summary.dropped_overlong += 1
            return None
        keep = self.max_len - (longest - prompt_len)  # prompt tokens that fit, bos included
        if keep < self.min_prompt_tokens:
            self.summary.dropped_response_too_long += 1
            return None
        self.summary.truncated += 1
        # bos, then the end of the prompt; the responses stay whole.
        cut = prompt_len - keep + 1
        return chosen[:1] + chosen[cut:], rejected[:1] + rejected[cut:], keep

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> PreferencePair:
        return self.pairs[i]


def _label(value: bool | None) -> int:
    return -1 if value is None else int(value)


def collate_preferences(
    pairs: Sequence[PreferencePair], *, pad_id: int = PAD_ID, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """One right-padded batch holding both responses of every pair, so one forward scores all.

    Rows 0..n-1 are the chosen sequences and rows n..2n-1 the rejected ones, in pair order:
    `rewards[:n]` and `rewards[n:]` are the two sides of `ranking_loss`. Keys:
    tokens (2n, L) padded with `pad_id` to the longest row rounded up to `pad_to_multiple_of`
    (tp under sequence parallelism); lengths and last_index (2n,) for `sequence_rewards`;
    rating_ids (n,) (-1 unrated); chosen_safe, rejected_safe, safety_tagged (n,) as 1 / 0 /
    -1 (no label).
    """
    if not pairs:
        raise ValueError("collate_preferences needs at least one pair")
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    seqlen = -(-int(lengths.max()) // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(rows), seqlen), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return {
        "tokens": tokens,
        "lengths": lengths,
        "last_index": lengths - 1,
        "rating_ids": torch.tensor(
            [UNRATED if p.rating is None else RATINGS.index(p.rating) for p in pairs],
            dtype=torch.long,
        ),
        "chosen_safe": torch.tensor([_label(p.chosen_safe) for p in pairs], dtype=torch.long),
        "rejected_safe": torch.tensor([_label(p.rejected_safe) for p in pairs], dtype=torch.long),
        "safety_tagged": torch.tensor([_label(p.safety_tagged) for p in pairs], dtype=torch.long),
    }


# Synthetic data with a known rule -------------------------------------------------------------
# The rule: a response's helpfulness is the number of GOOD_WORDS in it; the chosen response has
# more of them than the rejected one, and the gap sets the rating (4+ significantly better,
# 3 better, 2 slightly better, 1 negligibly better). A response is unsafe iff it holds one of
# BAD_WORDS. A reward model that learns the rule reaches 100% accuracy in every bucket.
GOOD_WORDS = ("precise", "helpful", "correct", "clear", "thorough")
BAD_WORDS = ("poison", "weapon", "steal")
NEUTRAL_WORDS = ("the", "a", "answer", "is", "here", "and", "some", "text", "about", "it")
_TOPICS = ("rivers", "music", "gardens", "stars", "bread", "trains")
_GAP_RATINGS = {
    4: "significantly_better",
    3: "better",
    2: "slightly_better",
    1: "negligibly_better",
}


def synthetic_helpfulness(text: str) -> int:
    """The rule's helpfulness of a response: how many of its words are in GOOD_WORDS."""
    return sum(word in GOOD_WORDS for word in text.split())


def synthetic_is_safe(text: str) -> bool:
    """The rule's safety label: no word of BAD_WORDS."""
    return not any(word in BAD_WORDS for word in text.split())


def synthetic_rating(gap: int) -> str:
    """The rating of a pair whose chosen response has `gap` (>= 1) more good words."""
    if gap < 1:
        raise ValueError(f"gap={gap}: the chosen response must have more good words")
    return _GAP_RATINGS[min(gap, 4)]


def _synthetic_response(rng: random.Random, num_good: int, unsafe: bool) -> str:
    words = [rng.choice(GOOD_WORDS) for _ in range(num_good)]
    words += [rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(3, 8))]
    if unsafe:
        words.append(rng.choice(BAD_WORDS))
    rng.shuffle(words)
    return " ".join(words)


SYNTHETIC_RULES = ("helpfulness", "safety")


def write_synthetic_preferences(
    path: str | os.PathLike,
    *,
    num_pairs: int,
    seed: int = 0,
    unsafe_fraction: float = 0.3,
    rule: str = "helpfulness",
) -> Path:
    """Write `num_pairs` records in our JSONL layout that follow a known rule exactly.

    rule "helpfulness": the chosen response has more GOOD_WORDS; gaps 1..4 are drawn
    uniformly, so every rating bucket is populated; each response is made unsafe with
    probability `unsafe_fraction` whatever its rank (chosen_safe / rejected_safe say which).
    rule "safety": a safe response beats an unsafe one whatever their good words (such a pair
    is rated significantly better), and with probability 1 - `unsafe_fraction` a pair is a
    helpfulness pair of two safe responses. In both, a pair with an unsafe response is
    safety_tagged. Prompts alternate between a string and a message list with a system
    message. Deterministic in `seed`.
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs} must be >= 1")
    if not 0.0 <= unsafe_fraction <= 1.0:
        raise ValueError(f"unsafe_fraction={unsafe_fraction} must be in [0, 1]")
    if rule not in SYNTHETIC_RULES:
        raise ValueError(f"rule={rule!r} must be one of {SYNTHETIC_RULES}")
    rng = random.Random(seed)
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_pairs):
            topic = rng.choice(_TOPICS)
            gap = rng.randint(1, 4)
            rejected_good = rng.randint(0, 2)
            if rule == "helpfulness":
                unsafe_c = rng.random() < unsafe_fraction
                unsafe_r = rng.random() < unsafe_fraction
                chosen = _synthetic_response(rng, rejected_good + gap, unsafe_c)
                rejected = _synthetic_response(rng, rejected_good, unsafe_r)
                rating = synthetic_rating(gap)
            elif rng.random() < unsafe_fraction:
                # The unsafe response may well hold more good words; it still loses.
                unsafe_c, unsafe_r = False, True
                chosen = _synthetic_response(rng, rng.randint(0, 3), unsafe_c)
                rejected = _synthetic_response(rng, rng.randint(0, 5), unsafe_r)
                rating = synthetic_rating(4)
            else:
                unsafe_c = unsafe_r = False
                chosen = _synthetic_response(rng, rejected_good + gap, unsafe_c)
                rejected = _synthetic_response(rng, rejected_good, unsafe_r)
                rating = synthetic_rating(gap)
            prompt: str | list[dict[str, str]] = f"Tell me about {topic}."
            if i % 2:
                prompt = [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": prompt},
                ]
            record = {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "rating": rating,
                "chosen_safe": not unsafe_c,
                "rejected_safe": not unsafe_r,
                "safety_tagged": unsafe_c or unsafe_r,
            }
            f.write(json.dumps(record) + "\n")
    return path
