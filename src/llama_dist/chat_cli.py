"""An interactive chat in the terminal: the Llama 2 chat template, history kept across turns,
each reply streamed as it is decoded.

Every turn encodes the whole dialog (system prompt, earlier turns, the new user message) as
Meta's `chat_completion` does and generates until eos; the reply's text joins the history.
When the dialog and `--max-new-tokens` outgrow the model's max_seq_len, the oldest turns are
dropped (the system prompt stays), and the reply is cut to the room left.

Command line: `python launch/chat.py --checkpoint runs/sft/checkpoints/step-1000
[--tokenizer tokenizer.model] [--system "You are a helpful assistant."]`; `/reset` clears the
history, `/exit` or end of input (Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from llama_dist.data.chat import encode_dialog
from llama_dist.generate import _DTYPES, check_sampling, load_for_generation, stream
from llama_dist.models.llama import Llama
from llama_dist.tokenizer import Tokenizer

PROMPT, REPLY = "user> ", "assistant> "
TOKENIZER_FILE = "tokenizer.model"
RUN_CONFIG = "config.yaml"
# sentencepiece renders an incomplete UTF-8 sequence (byte pieces still to come) as this.
_REPLACEMENT = "\ufffd"


def find_tokenizer(checkpoint: str | Path) -> Path:
    """The tokenizer of a checkpoint: the `tokenizer` entry of its run folder's config.yaml
    when the checkpoint lies in a run folder (runs/X/checkpoints/step-N, or runs/X/checkpoints),
    else a tokenizer.model in or beside the checkpoint folder."""
    checkpoint = Path(checkpoint)
    for run_dir in (checkpoint.parent, checkpoint.parent.parent):
        config = run_dir / RUN_CONFIG
        if not config.is_file():
            continue
        entry = OmegaConf.load(config).get("tokenizer")
        if entry is None:
            break
        # Relative entries are as the training command saw them (its working folder), or
        # relative to the run folder.
        for candidate in (Path(entry), run_dir / entry):
            if candidate.is_file():
                return candidate
        raise ValueError(
            f"{config} names tokenizer {entry!r}, which does not exist (from here or from the "
            "run folder); pass --tokenizer PATH"
        )
    for folder in (checkpoint, checkpoint.parent):
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    raise ValueError(
        f"found no tokenizer for {checkpoint}: no run folder config.yaml with a tokenizer entry "
        f"and no {TOKENIZER_FILE} in or beside it; pass --tokenizer PATH"
    )


class ChatSession:
    """A dialog with a model: the history and the sampling settings of every turn."""

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        *,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        notice: Callable[[str], None] = lambda _text: None,
    ) -> None:
        check_sampling(temperature=temperature, top_p=top_p, top_k=top_k)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
        self.generator = generator
        self.notice = notice
        self.history: list[dict[str, str]] = []  # user and assistant messages, alternating
        if system is not None:
            # The system text is checked now rather than at the first turn.
            encode_dialog(tokenizer, self._dialog([{"role": "user", "content": "."}]))

    def reset(self) -> None:
        self.history = []

    def _dialog(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return system + messages

    def prompt_ids(self, user_text: str) -> tuple[list[int], int]:
        """Token ids of the dialog ending with `user_text`, and the new tokens that fit after
        them; drops the oldest turns from the history while the dialog does not fit."""
        max_len = self.model.cfg.max_seq_len
        user = {"role": "user", "content": user_text}
        while True:
            ids = encode_dialog(self.tokenizer, self._dialog([*self.history, user])).ids
            if len(ids) + self.max_new_tokens <= max_len or not self.history:
                break
            self.history = self.history[2:]
            self.notice(f"(dropped the oldest turn to fit the context of {max_len} tokens)")
        if len(ids) >= max_len:
            raise ValueError(
                f"the message makes a prompt of {len(ids)} tokens, which leaves no room in the "
                f"model's context of max_seq_len={max_len} tokens; send a shorter message"
            )
        return ids, min(self.max_new_tokens, max_len - len(ids))

    def reply(self, user_text: str, write: Callable[[str], None]) -> str:
        """Generate the answer to `user_text`, passing each new piece of its text to `write`
        as soon as it is decoded; the answer joins the history and is returned."""
        ids, max_new_tokens = self.prompt_ids(user_text)
        eos = self.tokenizer.eos_id
        answer: list[int] = []
        shown = ""
        for token in stream(
            self.model,
            ids,
            max_new_tokens=max_new_tokens,
            eos_id=eos,
            generator=self.generator,
            **self.sampling,
        ):
            if token == eos:
                break
            answer.append(token)
            # Decoding the whole answer each time keeps sentencepiece's spacing; a piece is
            # shown once the text so far extends what was shown and ends in a whole character.
            text = self.tokenizer.decode(answer)
            if not text.endswith(_REPLACEMENT) and text.startswith(shown):
                write(text[len(shown) :])
                shown = text
        text = self.tokenizer.decode(answer)
        if text.startswith(shown) and text != shown:
            write(text[len(shown) :])
        self.history += [
            {"role": "user", "content": user_text},
            {"role": "assistant", "content": text},
        ]
        return text


def chat_loop(
    session: ChatSession,
    *,
    read: Callable[[str], str] = input,
    write: Callable[[str], None],
    notice: Callable[[str], None],
) -> None:
    """Read user messages until /exit or end of input; stream each reply to `write`."""
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            notice("(history cleared)")
            continue
        write(REPLY)
        try:
            session.reply(text, write)
        except ValueError as err:
            notice(f"error: {err}")
        write("\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chat.py", description="Chat with a llama_dist or HF Llama checkpoint."
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="llama_dist checkpoint folder (or folder of step-N checkpoints) or HF folder",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="tokenizer.model (default: the run folder's config.yaml entry, else a "
        "tokenizer.model in or beside the checkpoint)",
    )
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    parser.add_argument(
        "--temperature", type=float, default=0.6, help="0 decodes greedily (default: 0.6)"
    )
    parser.add_argument(
        "--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)"
    )
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely (default: 0, all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda if available, else cpu",
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    return parser.parse_args(argv)


def build_session(args: argparse.Namespace, notice: Callable[[str], None]) -> ChatSession:
    tokenizer = Tokenizer(args.tokenizer or find_tokenizer(args.checkpoint))
    model, cfg = load_for_generation(args.checkpoint, device=args.device, dtype=_DTYPES[args.dtype])
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
            f"vocab_size={cfg.vocab_size}; pass the tokenizer the model was trained with"
        )
    return ChatSession(
        model,
        tokenizer,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        generator=torch.Generator(device=args.device).manual_seed(args.seed),
        notice=notice,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def notice(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        session = build_session(args, notice)
    except ValueError as err:
        print(f"chat.py: error: {err}", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    notice("/reset clears the history, /exit or Ctrl-D quits")
    chat_loop(session, write=write, notice=notice)
    return 0
