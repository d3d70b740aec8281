"""Llama 2 chat format, token for token as Meta's reference `chat_completion`.

A dialog is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`:
an optional system message, then user and assistant alternating, starting with a user. The
system message is folded into the first user message. Each (user, assistant) pair is one
segment encoded as `<s>[INST] {user} [/INST] {answer} </s>`; a final user message without an
answer is the prompt to generate from, `<s>[INST] {user} [/INST]`. `[INST]` and `<<SYS>>` are
plain text, not special tokens (../shared/docs/llama2.md, "Supervised fine-tuning").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llama_dist.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# Meta's reference refuses dialogs whose text contains the markup, so no message can forge a
# turn boundary.
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatSegment:
    """One unit of a rendered dialog, encoded with bos, and with eos when it has an answer."""

    prompt: str  # "[INST] {user} [/INST]"
    answer: str | None  # " {answer} "; None for a final user message awaiting generation

    @property
    def text(self) -> str:
        return self.prompt if self.answer is None else self.prompt + self.answer

    @property
    def eos(self) -> bool:
        return self.answer is not None


@dataclass
class ChatTokens:
    """Token ids of a dialog and which of them are answer tokens (the ones trained on)."""

    ids: list[int]
    answer_mask: list[bool]  # True on answer tokens and their closing eos
    turns: list[int]  # each token's segment: 0 for the first (user, assistant) pair, ...

    def last_answer_mask(self) -> list[bool]:
        """`answer_mask` on the last answered turn only (Ghost Attention trains on it alone)."""
        answered = [t for t, a in zip(self.turns, self.answer_mask, strict=True) if a]
        if not answered:
            return list(self.answer_mask)
        last = answered[-1]
        return [a and t == last for t, a in zip(self.turns, self.answer_mask, strict=True)]


def render_dialog(dialog: Sequence[Mapping[str, str]]) -> list[ChatSegment]:
    """The text segments of `dialog` exactly as Meta's reference builds them."""
    _validate(dialog)
    messages = [{"role": m["role"], "content": m["content"]} for m in dialog]
    if messages[0]["role"] == "system":
        system, first, *rest = messages
        # The reference strips the merged text as a whole, never the system text itself.
        merged = B_SYS + system["content"] + E_SYS + first["content"]
        messages = [{"role": "user", "content": merged}, *rest]

    segments = []
    for i in range(0, len(messages), 2):
        prompt = f"{B_INST} {messages[i]['content'].strip()} {E_INST}"
        answer = None
        if i + 1 < len(messages):
            answer = f" {messages[i + 1]['content'].strip()} "
        segments.append(ChatSegment(prompt, answer))
    return segments


def encode_dialog(tokenizer: Tokenizer, dialog: Sequence[Mapping[str, str]]) -> ChatTokens:
    """Token ids of `dialog` (equal to Meta's reference) and the mask of answer tokens."""
    ids: list[int] = []
    answer_mask: list[bool] = []
    turns: list[int] = []
    for turn, segment in enumerate(render_dialog(dialog)):
        # Each whole segment is encoded at once, as the reference does; the prompt is encoded
        # again only to find where the answer begins.
        segment_ids = tokenizer.encode(segment.text, bos=True, eos=segment.eos)
        num_prompt = len(segment_ids)
        if segment.answer is not None:
            prompt_ids = tokenizer.encode(segment.prompt, bos=True, eos=False)
            num_prompt = len(prompt_ids)
            # Holds because the tokenizer splits pieces at whitespace and the answer starts
            # with a space.
            assert segment_ids[:num_prompt] == prompt_ids, (
                f"prompt tokens are not a prefix of the segment's tokens: {segment.text!r}"
            )
        ids += segment_ids
        answer_mask += [False] * num_prompt + [True] * (len(segment_ids) - num_prompt)
        turns += [turn] * len(segment_ids)
    return ChatTokens(ids=ids, answer_mask=answer_mask, turns=turns)


def _validate(dialog: Sequence[Mapping[str, str]]) -> None:
    if not dialog:
        raise ValueError("the dialog is empty; give at least one user message")
    for i, message in enumerate(dialog):
        if not isinstance(message, Mapping) or not {"role", "content"} <= message.keys():
            raise ValueError(
                f"message {i} must be a dict with the keys 'role' and 'content', got {message!r}"
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a str, got {type(content).__name__}")
        tags = [tag for tag in SPECIAL_TAGS if tag in content]
        if tags:
            raise ValueError(
                f"message {i} contains the chat markup {tags}, which would fake a turn "
                "boundary; remove it from the content"
            )
    start = 1 if dialog[0]["role"] == "system" else 0
    if start == len(dialog):
        raise ValueError("the dialog has only a system message; add a user message after it")
    for i in range(start, len(dialog)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        role = dialog[i]["role"]
        if role == expected:
            continue
        if role == "system":
            raise ValueError(f"message {i} is a system message; only the first message may be one")
        raise ValueError(
            f"message {i} has role {role!r} but {expected!r} was expected: after the optional "
            "system message, roles alternate user, assistant, user, ... starting with user"
        )
