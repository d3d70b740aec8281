"""Llama 2 model configuration and presets.

The presets reproduce the shapes of ../shared/docs/llama2.md ("Architecture", table of presets);
`tests/models/test_config.py` checks their exact parameter counts on the meta device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RopeScaling:
    """How rotary frequencies are adapted for a context longer than the one trained on.

    kind "none" leaves them as they are; "linear" divides every position by `factor`
    (position interpolation, Chen et al. 2023). A new base frequency is set through
    `LlamaConfig.rope_theta` instead.
    """

    kind: str = "none"  # "none" | "linear"
    factor: float = 1.0  # positions are divided by this when kind == "linear"

    def validate(self) -> None:
        if self.kind not in ("none", "linear"):
            raise ValueError(
                f"rope_scaling.kind={self.kind!r} is not supported; use 'none' or 'linear' "
                "(or change rope_theta for a new base frequency)"
            )
        if self.kind == "linear" and not self.factor >= 1.0:
            raise ValueError(
                f"rope_scaling.factor={self.factor} must be >= 1 for linear position scaling"
            )


@dataclass
class LlamaConfig:
    """Shape of a Llama 2 model. Every field can be overridden; `validate()` checks them."""

    dim: int = 4096  # model (residual stream) width
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None means n_heads (multi-head)
    vocab_size: int = 32000  # rows of the embedding (and of the output projection of an LM)
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # scales the 8/3 * dim FFN width (1.3 for 70B)
    ffn_hidden_dim: int | None = None  # explicit FFN hidden size; overrides the rule above
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # rotary base frequency
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 4096  # longest sequence the rotary table is built for
    # Width of the output projection: None = vocab_size (the language-model head); 1 = the
    # scalar head of a reward model (a regression score per position, read at the last token).
    output_dim: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)

    # Derived values -------------------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def output_width(self) -> int:
        """Rows of the output projection: vocab_size for an LM head, else output_dim."""
        return self.vocab_size if self.output_dim is None else self.output_dim

    @property
    def is_lm_head(self) -> bool:
        """Whether the output projection is the next-token head (its rows are the vocabulary)."""
        return self.output_dim is None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """FFN hidden size by Meta's reference rule, unless set explicitly."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    # Validation -----------------------------------------------------------------------------
    def validate(self) -> LlamaConfig:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
        if self.dim % self.n_heads:
            raise ValueError(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                "choose n_heads that divides dim (head_dim = dim / n_heads)"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} (dim / n_heads) must be even for rotary embeddings; "
                "change dim or n_heads"
            )
        kv = self.num_kv_heads
        if kv <= 0 or self.n_heads % kv:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={kv}; "
                "n_kv_heads must divide n_heads (e.g. 8 for grouped-query attention)"
            )
        if self.output_dim is not None and (
            not isinstance(self.output_dim, int) or self.output_dim <= 0
        ):
            raise ValueError(
                f"model.output_dim={self.output_dim!r} must be a positive integer (1 for a "
                "reward model's scalar head) or None for the language-model head"
            )
        if self.ffn_hidden_dim is not None and self.ffn_hidden_dim <= 0:
            raise ValueError(f"model.ffn_hidden_dim={self.ffn_hidden_dim} must be positive")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ValueError(f"model.ffn_dim_multiplier={self.ffn_dim_multiplier} must be > 0")
        if not self.norm_eps > 0:
            raise ValueError(f"model.norm_eps={self.norm_eps} must be > 0")
        if not self.rope_theta > 0:
            raise ValueError(f"model.rope_theta={self.rope_theta} must be > 0")
        self.rope_scaling.validate()
        return self

    # Counting -------------------------------------------------------------------------------
    def num_params(self, *, exclude_embedding: bool = False) -> int:
        """Exact parameter count of `Llama(self)` without building it."""
        d, hd, kv = self.dim, self.head_dim, self.num_kv_heads
        attn = d * d * 2 + d * kv * hd * 2  # wq, wo + wk, wv
        ffn = 3 * d * self.hidden_dim  # w1, w2, w3
        norms = 2 * d
        embedding = self.vocab_size * d
        head = self.output_width * d
        total = self.n_layers * (attn + ffn + norms) + d + embedding + head
        if exclude_embedding:
            total -= embedding
        return total

    def replace(self, **overrides: Any) -> LlamaConfig:
        return dataclasses.replace(self, **overrides).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: Any = None) -> LlamaConfig:
        """A validated config from `data` (as `to_dict` writes it); `source`, the file it was
        read from, is named in the errors."""
        where = f"{source}: " if source is not None else ""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{where}unknown model config keys {unknown}; valid keys are {sorted(known)}"
            )
        try:
            return cls(**data).validate()
        except (TypeError, ValueError) as e:
            if source is None:
                raise
            raise ValueError(f"{where}not a valid model config ({e})") from e


# Shapes from llama2.md; 34B is the CodeLlama-34B shape (never released as Llama 2).
PRESETS: dict[str, LlamaConfig] = {
    # ~0.9M parameters: unit and multi-process tests.
    "debug": LlamaConfig(
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=2048,
        multiple_of=64,
        max_seq_len=512,
    ),
    # ~15.6M parameters: the CPU demo (tokenizer with an 8000-piece vocabulary).
    "tiny": LlamaConfig(
        dim=384,
        n_layers=6,
        n_heads=6,
        n_kv_heads=2,
        vocab_size=8000,
        multiple_of=64,
        max_seq_len=1024,
    ),
    # ~94M parameters: CPU benchmarks and one-GPU smoke runs.
    "small": LlamaConfig(
        dim=640,
        n_layers=12,
        n_heads=10,
        n_kv_heads=2,
        vocab_size=32000,
        multiple_of=256,
        max_seq_len=2048,
    ),
    "7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, multiple_of=256),
    "13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=None, multiple_of=256),
    "34b": LlamaConfig(
        dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0
    ),
    "70b": LlamaConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3
    ),
}


def get_preset(name: str, **overrides: Any) -> LlamaConfig:
    """A validated copy of preset `name` with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
