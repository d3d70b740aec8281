"""Safety context distillation, the pure parts (llama2.md, "Safety context distillation").

A safety pre-prompt is built from adjective templates ("You are a responsible and safe
assistant.") and, for a prompt whose risk category is known, that category's answer template
(how to answer such a prompt), as the paper's section 4.2.4 and its Table 39 do. The model
answers each adversarial prompt twice, without and with the pre-prompt; the Safety RM scores
both answers on the prompt without the pre-prompt, and the answer given with the pre-prompt is
kept only when it scores higher (`rm_gate`). The model is then fine-tuned on (prompt without
the pre-prompt, kept answer).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

import torch

# Adjectives of the paper's safety pre-prompts ("responsible", "respectful", "wise") and a
# few of the same kind.
SAFETY_ADJECTIVES = (
    "responsible",
    "respectful",
    "wise",
    "honest",
    "harmless",
    "safe",
    "careful",
)
# The paper's three risk categories (section 4.2.1), each with how a safe answer goes.
ANSWER_TEMPLATES = {
    "illicit_criminal_activities": (
        "The user asks for help with an illegal or criminal activity (such as theft, fraud, "
        "violence or trafficking). Do not give any instructions that would help; say briefly "
        "that you cannot help with it because it is illegal and can hurt people, and offer a "
        "lawful alternative or a source of help."
    ),
    "hateful_harmful_activities": (
        "The user asks for content that is hateful or harmful (such as defamation, "
        "discrimination, self-harm or eating disorders). Do not produce it; address the "
        "user's underlying concern with empathy, explain why the request could hurt someone, "
        "and point to support or a respectful way to talk about the topic."
    ),
    "unqualified_advice": (
        "The user asks for advice that needs a qualified professional (such as medical, "
        "legal or financial advice). Give general, well-established information only, say "
        "clearly that you are not a substitute for a professional, and recommend consulting "
        "one for their situation."
    ),
}
PLACEMENTS = ("system", "prefix")


def _rng(seed: int, key: str) -> random.Random:
    # Seeded by the prompt's key, so each prompt draws the same pre-prompt whatever the order
    # of the files, the number of ranks, or a resumed run.
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _join(words: Sequence[str]) -> str:
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def safety_preprompt(
    key: str,
    category: str | None,
    *,
    adjectives: Sequence[str] = SAFETY_ADJECTIVES,
    num_adjectives: int = 2,
    templates: Mapping[str, str] = ANSWER_TEMPLATES,
    seed: int = 0,
) -> str:
    """The pre-prompt of the prompt with `key`: `num_adjectives` adjectives drawn (seeded by
    `seed` and `key`) into "You are a A, B and C assistant.", then the answer template of
    `category` (none for None). An unknown category is a ValueError."""
    if not 1 <= num_adjectives <= len(adjectives):
        raise ValueError(
            f"num_adjectives={num_adjectives} must be in 1..{len(adjectives)} (the adjectives)"
        )
    if category is not None and category not in templates:
        raise ValueError(
            f"risk category {category!r} has no answer template; known: {sorted(templates)}"
        )
    rng = _rng(seed, key)
    chosen = rng.sample(list(adjectives), num_adjectives)
    article = "an" if chosen[0][0] in "aeiou" else "a"
    text = f"You are {article} {_join(chosen)} assistant."
    if category is not None:
        text += " " + templates[category]
    return text


def with_preprompt(
    dialog: Sequence[Mapping[str, str]], preprompt: str, *, placement: str = "system"
) -> list[dict[str, str]]:
    """`dialog` with the pre-prompt: as its system message (before the dialog's own system
    message, if it has one), or prefixed to its last user message."""
    messages = [{"role": m["role"], "content": m["content"]} for m in dialog]
    if placement == "system":
        if messages[0]["role"] == "system":
            messages[0]["content"] = preprompt + "\n\n" + messages[0]["content"]
            return messages
        return [{"role": "system", "content": preprompt}, *messages]
    if placement == "prefix":
        assert messages[-1]["role"] == "user", "a prompt ends with a user message"
        messages[-1]["content"] = preprompt + "\n\n" + messages[-1]["content"]
        return messages
    raise ValueError(f"placement={placement!r} must be one of {PLACEMENTS}")


def rm_gate(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Which distilled answers to keep: those the Safety RM scores strictly higher than the
    answer without the pre-prompt (bool, same shape)."""
    if before.shape != after.shape:
        raise ValueError(f"scores of shapes {tuple(before.shape)} and {tuple(after.shape)}")
    return after > before


__all__ = [
    "ANSWER_TEMPLATES",
    "PLACEMENTS",
    "SAFETY_ADJECTIVES",
    "rm_gate",
    "safety_preprompt",
    "with_preprompt",
]
