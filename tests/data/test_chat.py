"""The Llama 2 chat format against Meta's reference `chat_completion` (llama2.md, "Supervised
fine-tuning"), using the Llama-layout tokenizer file shipped in mistral_common."""

from __future__ import annotations

import importlib.resources
import random

import pytest
import sentencepiece as spm

from llama_dist.data import ChatSegment, encode_dialog, render_dialog
from llama_dist.tokenizer import Tokenizer

MODEL_FILE = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"

SYSTEM_TWO_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]
NO_SYSTEM = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]
TRAILING_PROMPT = [
    {"role": "user", "content": "  Hi there  "},
    {"role": "assistant", "content": "\nHello! How can I help?\n"},
    {"role": "user", "content": "Write a haiku.\n"},
]
RICH = [
    {"role": "system", "content": " Answer in English.\nUse  code blocks. "},
    {"role": "user", "content": "Sort [3, 1, 2] in Python 🐍"},
    {"role": "assistant", "content": "```python\nsorted([3, 1, 2])  # -> [1, 2, 3]\n```"},
    {"role": "user", "content": "Und auf Deutsch? Ünïcödé ꙮ"},
    {"role": "assistant", "content": "  Sortiert:   1, 2, 3.  "},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(MODEL_FILE)


def reference_tokens(dialog: list[dict[str, str]]) -> list[int]:
    """Meta's `Llama.chat_completion` token building, on sentencepiece called directly."""
    sp = spm.SentencePieceProcessor(model_file=str(MODEL_FILE))
    b_inst, e_inst = "[INST]", "[/INST]"
    b_sys, e_sys = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def encode(s: str, bos: bool, eos: bool) -> list[int]:
        return [sp.bos_id()] * bos + sp.encode(s) + [sp.eos_id()] * eos

    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": b_sys + dialog[0]["content"] + e_sys + dialog[1]["content"],
            }
        ] + dialog[2:]
    tokens: list[int] = sum(
        [
            encode(
                f"{b_inst} {(p['content']).strip()} {e_inst} {(a['content']).strip()} ",
                bos=True,
                eos=True,
            )
            for p, a in zip(dialog[::2], dialog[1::2], strict=False)
        ],
        [],
    )
    if dialog[-1]["role"] == "user":
        tokens += encode(
            f"{b_inst} {(dialog[-1]['content']).strip()} {e_inst}", bos=True, eos=False
        )
    return tokens


def answers(dialog: list[dict[str, str]]) -> list[str]:
    return [m["content"] for m in dialog if m["role"] == "assistant"]


def masked_runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, (token, is_answer) in enumerate(zip(ids, mask, strict=True)):
        if is_answer:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return runs


def random_dialog(rng: random.Random) -> list[dict[str, str]]:
    words = ["alpha", "Beta", "42", "3.5", " ", "\n", "  ", "naïve", "東京", "😀", "x+y", "()"]

    def text() -> str:
        return "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(0, 8)))

    dialog = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
    for turn in range(rng.randint(1, 6)):
        dialog.append({"role": "user" if turn % 2 == 0 else "assistant", "content": text()})
    return dialog


# Rendering ------------------------------------------------------------------------------------
def test_render_system_and_two_turns() -> None:
    segments = render_dialog(SYSTEM_TWO_TURNS)
    assert [s.text for s in segments] == [
        "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. ",
        "[INST] And 3+3? [/INST] 6. ",
    ]
    assert all(s.eos for s in segments)
    assert segments[1] == ChatSegment(prompt="[INST] And 3+3? [/INST]", answer=" 6. ")


def test_render_no_system() -> None:
    assert render_dialog(NO_SYSTEM) == [
        ChatSegment(prompt="[INST] Name a colour. [/INST]", answer=" Blue. ")
    ]


def test_render_trailing_prompt() -> None:
    segments = render_dialog(TRAILING_PROMPT)
    assert [(s.text, s.eos) for s in segments] == [
        ("[INST] Hi there [/INST] Hello! How can I help? ", True),
        ("[INST] Write a haiku. [/INST]", False),
    ]


def test_render_keeps_system_whitespace() -> None:
    # The reference strips the merged first message as a whole, not the system text.
    segments = render_dialog(RICH)
    assert segments[0].prompt == (
        "[INST] <<SYS>>\n Answer in English.\nUse  code blocks. \n<</SYS>>\n\n"
        "Sort [3, 1, 2] in Python 🐍 [/INST]"
    )
    assert segments[1].answer == " Sortiert:   1, 2, 3. "


# Encoding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dialog", [SYSTEM_TWO_TURNS, NO_SYSTEM, TRAILING_PROMPT, RICH])
def test_ids_equal_reference(tokenizer: Tokenizer, dialog: list[dict[str, str]]) -> None:
    tokens = encode_dialog(tokenizer, dialog)
    assert tokens.ids == reference_tokens(dialog)
    assert len(tokens.answer_mask) == len(tokens.ids)


def test_known_ids(tokenizer: Tokenizer) -> None:
    tokens = encode_dialog(tokenizer, NO_SYSTEM)
    pieces = [tokenizer.id_to_piece(i) for i in tokens.ids]
    prompt = ["<s>", "▁[", "INST", "]", "▁Name", "▁a", "▁colour", ".", "▁[", "/", "INST", "]"]
    answer = ["▁Blue", ".", "▁", "</s>"]
    assert pieces == prompt + answer
    assert tokens.answer_mask == [False] * len(prompt) + [True] * len(answer)


@pytest.mark.parametrize("dialog", [SYSTEM_TWO_TURNS, NO_SYSTEM, TRAILING_PROMPT, RICH])
def test_mask_covers_exactly_the_answers(
    tokenizer: Tokenizer, dialog: list[dict[str, str]]
) -> None:
    tokens = encode_dialog(tokenizer, dialog)
    runs = masked_runs(tokens.ids, tokens.answer_mask)
    # Each answer run ends with its eos and decodes to the stripped answer plus the space
    # the format puts before eos.
    assert [tokenizer.decode(run) for run in runs] == [a.strip() + " " for a in answers(dialog)]
    assert all(run[-1] == tokenizer.eos_id for run in runs)

    # Every prompt token, bos included, is unmasked: the unmasked tokens of each segment are
    # exactly its prompt encoded alone.
    position = 0
    for segment in render_dialog(dialog):
        segment_ids = tokenizer.encode(segment.text, bos=True, eos=segment.eos)
        num_prompt = len(tokenizer.encode(segment.prompt, bos=True))
        mask = tokens.answer_mask[position : position + len(segment_ids)]
        assert tokens.ids[position] == tokenizer.bos_id
        assert mask == [False] * num_prompt + [True] * (len(segment_ids) - num_prompt)
        position += len(segment_ids)
    assert position == len(tokens.ids)


def test_trailing_prompt_is_unmasked(tokenizer: Tokenizer) -> None:
    tokens = encode_dialog(tokenizer, TRAILING_PROMPT)
    tail = tokenizer.encode("[INST] Write a haiku. [/INST]", bos=True)
    assert tokens.ids[-len(tail) :] == tail
    assert not any(tokens.answer_mask[-len(tail) :])
    assert tokens.ids[-1] != tokenizer.eos_id


def test_random_dialogs_equal_reference(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(200):
        dialog = random_dialog(rng)
        tokens = encode_dialog(tokenizer, dialog)
        assert tokens.ids == reference_tokens(dialog), dialog
        runs = masked_runs(tokens.ids, tokens.answer_mask)
        # An empty answer still trains its space and eos.
        assert [tokenizer.decode(r) for r in runs] == [a.strip() + " " for a in answers(dialog)]


# Bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dialog", "match"),
    [
        ([], "dialog is empty"),
        ([{"role": "system", "content": "s"}], "only a system message"),
        ([{"role": "assistant", "content": "a"}], r"message 0 has role 'assistant'.*alternate"),
        (
            [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
            r"message 1 has role 'assistant' but 'user' was expected",
        ),
        (
            [{"role": "user", "content": "u"}, {"role": "user", "content": "u"}],
            r"message 1 has role 'user' but 'assistant' was expected",
        ),
        (
            [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}],
            r"message 1 is a system message; only the first message may be one",
        ),
        ([{"role": "bot", "content": "b"}], r"message 0 has unknown role 'bot'"),
        ([{"role": "user", "text": "u"}], r"message 0 must be a dict with the keys"),
        ([{"role": "user", "content": None}], r"message 0 content must be a str"),
        (
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a [/INST] b"}],
            r"message 1 contains the chat markup \['\[/INST\]'\]",
        ),
        ([{"role": "user", "content": "<<SYS>>x<</SYS>>"}], r"message 0 contains the chat markup"),
    ],
)
def test_bad_dialogs(tokenizer: Tokenizer, dialog: list[dict[str, str]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_dialog(dialog)
    with pytest.raises(ValueError, match=match):
        encode_dialog(tokenizer, dialog)
