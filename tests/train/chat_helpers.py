"""Shared pieces of the chat-model tests: a small tokenizer, learnable dialogs, a base model."""

from __future__ import annotations

import json
import random
from pathlib import Path

from llama_dist.checkpoint import save_model_checkpoint
from llama_dist.models.config import LlamaConfig
from llama_dist.models.llama import Llama
from llama_dist.models.reward import reward_config
from llama_dist.tokenizer import train_tokenizer

WORDS = "the cat sat on a mat and dog ran to big red sun in sky we see it now".split()
VOCAB = 320
BASE = LlamaConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=VOCAB,
    ffn_hidden_dim=128,
    max_seq_len=128,
)


def make_tokenizer(root: Path, words: tuple[str, ...] = ()) -> Path:
    """A 320-piece tokenizer trained on WORDS (and `words`, e.g. the synthetic preference
    vocabulary), so that each of them is one piece or two."""
    rng = random.Random(0)
    vocab = [*WORDS, *words]
    lines = [" ".join(rng.choice(vocab) for _ in range(rng.randint(4, 12))) for _ in range(400)]
    lines += ["repeat: " + line for line in lines[:50]]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    return train_tokenizer([corpus], root / "tokenizer.model", vocab_size=VOCAB, num_threads=1)


def dialogs(n: int, *, seed: int = 0) -> list[list[dict[str, str]]]:
    """Learnable dialogs: the assistant repeats the user's words; some have a system prompt,
    some two turns."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        dialog = []
        if i % 3 == 0:
            dialog.append({"role": "system", "content": "you repeat"})
        for _ in range(1 + (i % 4 == 1)):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            dialog += [
                {"role": "user", "content": f"repeat: {words}"},
                {"role": "assistant", "content": words},
            ]
        out.append(dialog)
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def base_checkpoint(path: Path, seed: int = 0) -> Path:
    model = Llama(BASE)
    model.init_weights(seed)
    return save_model_checkpoint(path, model.state_dict(), BASE)


def reward_checkpoint(path: Path, seed: int) -> Path:
    """A reward model of BASE's backbone with random weights (a scalar head)."""
    model = Llama(reward_config(BASE))
    model.init_weights(seed)
    return save_model_checkpoint(path, model.state_dict(), model.cfg)
