"""How well a model keeps following a first-turn instruction: the adherence table (the
paper's Table 30) and the attention its answers pay to the instruction (its Figure 10).

Adherence: `evaluate_adherence(respond, dialogs)` talks with a responder (`data.gatt`'s
`model_responder` over a checkpoint, or a rule-based one) as a user would, the instruction
in the first user turn only (the system message), the later user messages plain, each turn
answered on the dialog so far with the responder's own earlier answers. Each answer at turn t
is checked with the instruction's checks (`rlhf.instructions`); `AdherenceTable` holds the
fraction passed per instruction kind and turn, and `markdown()` lays it out as Table 30:
rows the instruction kinds (and "all"), columns the turns 1..N.

Attention: `system_attention(model, tokenizer, dialog)` runs the model once on a rendered
dialog and returns, per layer, the attention mass each token of the last answer puts on the
instruction's tokens (mean over heads), a (layers, answer tokens) array;
`plot_system_attention` draws it as a heat map PNG. The weights are computed beside the
model, from each layer's q and k in a forward pre-hook on its attention (`attention_weights`,
`attention_mass`): the model's forward, which runs SDPA, is not changed, and the extra work
happens only inside these functions.

An evaluation stage calls `evaluate_adherence` on held-out dialogs with instructions (e.g.
`data.gatt.write_synthetic_dialogs`, or `read_gatt_dialogs` + `with_instructions(...,
require_check=True)`) for each model and writes `table.markdown()`; then
`plot_system_attention(system_attention(...), path)` on one dialog.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llama_dist.data.chat import encode_dialog
from llama_dist.data.gatt import GattDialog, Responder, conversation, max_turns
from llama_dist.models.llama import Attention, Llama, apply_rotary
from llama_dist.tokenizer import Tokenizer

ALL = "all"


# Adherence ----------------------------------------------------------------------------------
@dataclass
class AdherenceTable:
    """Answers that passed their instruction's checks, per instruction kind and turn."""

    num_turns: int
    passed: dict[str, list[int]] = field(default_factory=dict)  # kind -> per turn
    counted: dict[str, list[int]] = field(default_factory=dict)  # kind -> per turn
    answers: list[list[str]] = field(default_factory=list)  # per dialog, per turn

    def add(self, kind: str, turn: int, ok: bool) -> None:
        for key in (kind, ALL):
            self.passed.setdefault(key, [0] * self.num_turns)[turn - 1] += ok
            self.counted.setdefault(key, [0] * self.num_turns)[turn - 1] += 1

    @property
    def kinds(self) -> list[str]:
        """The rows: instruction kinds in sorted order, then "all"."""
        return sorted(k for k in self.counted if k != ALL) + [ALL]

    def fraction(self, kind: str, turn: int) -> float | None:
        """Share of the answers at `turn` (1-based) that passed; None when none were given."""
        counted = self.counted.get(kind, [0] * self.num_turns)[turn - 1]
        return self.passed[kind][turn - 1] / counted if counted else None

    def rows(self) -> dict[str, list[float | None]]:
        return {k: [self.fraction(k, t) for t in range(1, self.num_turns + 1)] for k in self.kinds}

    def markdown(self) -> str:
        header = "| instruction | " + " | ".join(f"turn {t}" for t in range(1, self.num_turns + 1))
        lines = [header + " |", "|---|" + "---:|" * self.num_turns]
        for kind, row in self.rows().items():
            cells = " | ".join("-" if f is None else f"{100 * f:.0f}%" for f in row)
            lines.append(f"| {kind} | {cells} |")
        return "\n".join(lines) + "\n"


def evaluate_adherence(
    respond: Responder,
    dialogs: Sequence[GattDialog],
    *,
    num_turns: int | None = None,
    placement: str = "system",
) -> AdherenceTable:
    """Talk through every dialog, up to `num_turns` turns (default: the longest dialog's),
    the instruction in the first user turn only, and check every answer. One `respond` call
    per turn holds every dialog still running (even none: ranks evaluating together on a mesh
    with the same `num_turns` call it equally often), so a model responder batches them."""
    unchecked = [
        i for i, d in enumerate(dialogs) if d.instruction is None or not d.instruction.checks
    ]
    if unchecked:
        raise ValueError(
            f"dialogs {unchecked[:5]} have no instruction with a check, so adherence cannot be "
            "measured; give each an instruction with a checkable rule (require_check=True)"
        )
    num_turns = max_turns(dialogs) if num_turns is None else num_turns
    table = AdherenceTable(num_turns=num_turns, answers=[[] for _ in dialogs])
    for t in range(num_turns):
        active = [i for i, d in enumerate(dialogs) if len(d.users) > t]
        views = [
            conversation(
                dialogs[i].users[: t + 1],
                table.answers[i],
                system=dialogs[i].instruction.text,
                placement=placement,
            )
            for i in active
        ]
        replies = respond(views)
        if len(replies) != len(views):
            raise ValueError(f"the responder gave {len(replies)} answers to {len(views)} dialogs")
        for i, reply in zip(active, replies, strict=True):
            instruction = dialogs[i].instruction
            table.answers[i].append(reply.strip())
            table.add(instruction.kind, t + 1, instruction.check(reply.strip()))
    return table


def write_adherence_report(
    table: AdherenceTable, path: str | os.PathLike, *, title: str = "Instruction adherence"
) -> Path:
    """The table as a markdown page."""
    path = Path(path)
    text = (
        f"# {title}\n\nShare of answers at each turn that follow the first turn's instruction "
        f"(instruction in the first user turn only).\n\n{table.markdown()}"
    )
    path.write_text(text, encoding="utf-8")
    return path


# Attention ----------------------------------------------------------------------------------
def layer_attention_probs(
    attention: Attention,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """The softmax weights (bsz, heads, seqlen, seqlen), in fp32, that `attention` (a layer's
    `Attention`, called on its input x) gives each query over the keys; mask None is causal,
    a boolean (bsz, 1, seqlen, seqlen) mask as the model's document mask. No KV cache."""
    bsz, seqlen, _ = x.shape
    q = attention.wq(x).view(bsz, seqlen, -1, attention.head_dim)
    k = attention.wk(x).view(bsz, seqlen, -1, attention.head_dim)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    # Query head h reads kv head h // n_rep, as SDPA's enable_gqa and repeat_interleave do.
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(attention.head_dim)
    if mask is None:
        mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


@contextlib.contextmanager
def _each_layer_probs(model: Llama, use: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """While open, every forward of `model` calls use(layer index, probs) for each layer."""

    def hook(index: int):
        def pre_hook(module: Attention, args: tuple) -> None:
            x, cos, sin, mask = args
            if not (mask is None or isinstance(mask, torch.Tensor)):
                raise ValueError("attention weights need the sdpa backend, not flex")
            use(index, layer_attention_probs(module, x, cos, sin, mask))

        return pre_hook

    handles = [
        layer.attention.register_forward_pre_hook(hook(i))
        for i, layer in enumerate(model.layers.values())
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _as_batch(model: Llama, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    device = model.tok_embeddings.weight.device
    return torch.as_tensor(tokens, dtype=torch.long, device=device).reshape(1, -1)


@torch.no_grad()
def attention_weights(model: Llama, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Attention weights (layers, heads, seqlen, seqlen) of one sequence, plain causal. Holds
    every layer's full matrix: for short sequences (tests, inspection)."""
    out: dict[int, torch.Tensor] = {}
    with _each_layer_probs(model, lambda i, p: out.__setitem__(i, p[0])):
        model(_as_batch(model, tokens))
    return torch.stack([out[i] for i in range(len(out))])


@torch.no_grad()
def attention_mass(
    model: Llama,
    tokens: Sequence[int] | torch.Tensor,
    *,
    key_mask: Sequence[bool],
    query_mask: Sequence[bool],
) -> np.ndarray:
    """(layers, queries) attention mass the positions of `query_mask` put on the keys of
    `key_mask`, mean over heads; each layer is reduced as soon as it is computed."""
    device = model.tok_embeddings.weight.device
    keys = torch.tensor(list(key_mask), dtype=torch.bool, device=device)
    queries = torch.tensor(list(query_mask), dtype=torch.bool, device=device)
    out: dict[int, torch.Tensor] = {}

    def use(i: int, probs: torch.Tensor) -> None:
        # (heads, queries, keys) -> (queries,)
        out[i] = probs[0][:, queries][:, :, keys].sum(-1).mean(0).cpu()

    with _each_layer_probs(model, use):
        model(_as_batch(model, tokens))
    return torch.stack([out[i] for i in range(len(out))]).numpy()


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _piece_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    if token in (tokenizer.bos_id, tokenizer.eos_id):
        return b""
    piece = tokenizer.id_to_piece(token)
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def text_token_mask(tokenizer: Tokenizer, tokens: Sequence[int], text: str) -> list[bool]:
    """Which of `tokens` cover the first occurrence of `text` in their decoded text (every
    token overlapping it)."""
    pieces = [_piece_bytes(tokenizer, t) for t in tokens]
    joined = b"".join(pieces)
    start = joined.find(text.encode("utf-8"))
    if start < 0:
        raise ValueError(f"{text!r} is not in the tokens' text")
    end = start + len(text.encode("utf-8"))
    mask, at = [], 0
    for piece in pieces:
        mask.append(bool(piece) and at < end and at + len(piece) > start)
        at += len(piece)
    return mask


@dataclass
class SystemAttention:
    """Attention of an answer's tokens to the instruction, per layer."""

    mass: np.ndarray  # (layers, answer tokens): mass on the instruction tokens, head mean
    pieces: list[str]  # the answer's tokens as pieces (the heat map's columns)
    num_instruction_tokens: int


def system_attention(
    model: Llama,
    tokenizer: Tokenizer,
    dialog: Sequence[Mapping[str, str]],
    *,
    instruction: str | None = None,
) -> SystemAttention:
    """The attention the tokens of `dialog`'s last answer (and its eos) pay to the
    instruction's tokens in each layer; `instruction` defaults to the system message."""
    if instruction is None:
        if dialog[0]["role"] != "system":
            raise ValueError("the dialog has no system message; pass the instruction text")
        instruction = dialog[0]["content"]
    if dialog[-1]["role"] != "assistant":
        raise ValueError("the dialog must end with the answer whose attention is measured")
    encoded = encode_dialog(tokenizer, dialog)
    if len(encoded.ids) > model.cfg.max_seq_len:
        raise ValueError(
            f"the dialog has {len(encoded.ids)} tokens, more than the model's max_seq_len="
            f"{model.cfg.max_seq_len}; take a shorter one"
        )
    keys = text_token_mask(tokenizer, encoded.ids, instruction.strip())
    queries = encoded.last_answer_mask()
    mass = attention_mass(model, encoded.ids, key_mask=keys, query_mask=queries)
    pieces = [tokenizer.id_to_piece(t) for t, q in zip(encoded.ids, queries, strict=True) if q]
    return SystemAttention(mass=mass, pieces=pieces, num_instruction_tokens=sum(keys))


def plot_system_attention(
    result: SystemAttention, path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """A heat map PNG: layers (rows) by answer tokens (columns), colour the attention mass on
    the instruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers, num_tokens = result.mass.shape
    fig, ax = plt.subplots(figsize=(min(5 + 0.3 * num_tokens, 16), 2 + 0.4 * num_layers))
    image = ax.imshow(result.mass, aspect="auto", cmap="viridis", vmin=0.0, origin="lower")
    step = max(1, num_tokens // 40)
    ax.set_xticks(range(0, num_tokens, step))
    ax.set_xticklabels(result.pieces[::step], rotation=90, fontsize=7)
    ax.set_yticks(range(num_layers))
    ax.set_xlabel("answer token")
    ax.set_ylabel("layer")
    ax.set_title(
        title or f"Attention to the instruction ({result.num_instruction_tokens} tokens), head mean"
    )
    fig.colorbar(image, ax=ax, label="attention mass")
    out = Path(path)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
