"""The Llama 2 architecture (../shared/docs/llama2.md, "Architecture").

Plain PyTorch with Meta's reference parameter names. The model knows nothing of distribution:
attention reshapes with `view(bsz, seqlen, -1, head_dim)`, so a tensor-parallel shard that
holds a subset of the heads runs the same code.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from llama_dist.losses import IGNORE_INDEX, cross_entropy_loss, linear_cross_entropy
from llama_dist.models.config import LlamaConfig, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as Meta's reference and HF do.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight


def rope_tables(
    head_dim: int, seq_len: int, theta: float, scaling: RopeScaling, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (seq_len, head_dim // 2), in fp32.

    This is the hook for long-context scaling: "linear" divides positions by the factor
    (position interpolation); a new base frequency comes in through `theta`.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    positions = torch.arange(seq_len, device=device).float()
    if scaling.kind == "linear":
        positions = positions / scaling.factor
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head: Meta's complex-number layout.

    x: (bsz, seqlen, heads, head_dim); cos, sin: (seqlen, head_dim // 2) or
    (bsz, seqlen, head_dim // 2) when every sequence has its own positions. Computed in fp32.
    Eager, the pairs are complex numbers and the rotation one complex multiplication, as in
    Meta's reference (one kernel, ~3x fewer bytes moved); inductor has no complex numbers, so
    under torch.compile the same products are written out in real arithmetic.
    """
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    pairs = x.float().unflatten(-1, (-1, 2))  # (bsz, seqlen, heads, head_dim // 2, 2)
    if not torch.compiler.is_compiling():
        rotated = torch.view_as_complex(pairs) * torch.complex(cos.float(), sin.float())
        return torch.view_as_real(rotated).flatten(-2).type_as(x)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


@dataclass(frozen=True, eq=False)
class LayerKVCache:
    """One layer's keys and values in a `KVCache`; the new ones are written from `start`."""

    k: torch.Tensor  # (bsz, max_len, n_kv_heads, head_dim)
    v: torch.Tensor  # (bsz, max_len, n_kv_heads, head_dim)
    start: int

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (bsz, seqlen, n_kv_heads, head_dim); return all cached and new ones."""
        end = self.start + k.shape[1]
        self.k[:, self.start : end] = k
        self.v[:, self.start : end] = v
        return self.k[:, :end], self.v[:, :end]


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for incremental decoding.

    Made by `Llama.new_kv_cache` and passed to `Llama.forward(..., kv_cache=)`, which appends
    the new tokens and advances `length`. Keys and values are kept before the grouped-query
    repeat, so the cache holds n_kv_heads heads. `document_ids` remembers each cached token's
    document so that later tokens attend within their own (padding is a document of its own).
    """

    def __init__(
        self,
        layer_ids: list[int],
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(
                f"KV cache batch_size={batch_size} and max_len={max_len} must be positive; "
                "max_len is the prompt length plus the tokens to generate"
            )
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        self.document_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.length = 0
        # Until document ids are given, the plain causal mask (or none) suffices.
        self.has_documents = False

    @property
    def batch_size(self) -> int:
        return self.document_ids.shape[0]

    @property
    def max_len(self) -> int:
        return self.document_ids.shape[1]

    def layer(self, layer_id: int) -> LayerKVCache:
        return LayerKVCache(self.k[layer_id], self.v[layer_id], self.length)

    def attention_mask(self, seqlen: int, document_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean SDPA mask of `seqlen` new queries over the cached and new keys, (bsz, 1,
        seqlen, length + seqlen) or without the batch dimensions when no document ids were
        ever given; None when SDPA needs none (see `Attention.forward`).

        Records the new tokens' document ids: `document_ids` (bsz, seqlen), or by default the
        document of each row's last cached token (document 0 in an empty cache).
        """
        start, end = self.length, self.length + seqlen
        if document_ids is None and not self.has_documents:
            if start == 0 or seqlen == 1:
                return None
            new_docs = None
        elif document_ids is None:
            new_docs = self.document_ids[:, start - 1 : start].expand(-1, seqlen)
        else:
            self.has_documents = True
            new_docs = document_ids
        # SDPA's is_causal aligns the mask top-left; the new queries sit at slots start..end-1.
        slots = torch.arange(end, device=self.document_ids.device)
        mask = slots[None, :] <= slots[start:, None]  # (seqlen, end)
        if new_docs is None:
            return mask
        self.document_ids[:, start:end] = new_docs
        same_doc = new_docs[:, :, None] == self.document_ids[:, None, :end]
        return (same_doc & mask)[:, None]


# How packed documents (`document_ids`) are kept apart: "sdpa" passes a dense boolean
# (bsz, 1, seq, seq) mask to SDPA; "flex" runs FlexAttention with a BlockMask, which never
# holds a (seq, seq) tensor on GPU. Without document_ids both use SDPA's causal kernel.
ATTENTION_BACKENDS = ("sdpa", "flex")


@functools.cache
def _compiled(fn: Callable) -> Callable:
    """`torch.compile(fn)`, made once per process on first use (importing the model compiles
    nothing). Eager flex_attention materialises the whole score matrix and eager
    create_block_mask the dense mask; only compiled do they run block by block."""
    return torch.compile(fn)


def flex_attention_gqa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """FlexAttention of q (bsz, heads, seq, head_dim) over k, v (bsz, kv_heads, seq, head_dim),
    grouped-query heads served by the kernel (no repeated K/V)."""
    fn = flex_attention
    # Eager on CUDA it needs its own compiled wrapper for the fused kernel; inside a compiled
    # block dynamo traces it into the block's graph anyway. On CPU torch 2.13 has only the
    # forward, run eagerly as a check against the dense mask.
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        fn = _compiled(flex_attention)
    if q.device.type == "cpu" and torch.compiler.is_compiling():
        # Inductor's CPU FlexAttention template (torch 2.13) reads a 4-D size off the buffer
        # that produced q and k, which the rotary's (..., head_dim // 2, 2) stack is not.
        q, k = q.contiguous(), k.contiguous()
    return fn(q, k, v, block_mask=block_mask, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BlockMask | None,
        *,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """`mask`: None (causal), a boolean SDPA mask, or a FlexAttention `BlockMask` (from
        `document_block_mask`; not with a cache). With `kv_cache`, x holds the tokens after
        the cached ones; `mask` then covers the cached and new keys (see
        `KVCache.attention_mask`)."""
        bsz, seqlen, _ = x.shape
        # -1 instead of the head count: under tensor parallelism each rank holds a subset.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        is_causal = mask is None
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
            # SDPA's causal mask is aligned top-left, right only for queries that start at slot
            # 0; later a lone query needs no mask at all, several get an explicit one.
            is_causal = mask is None and kv_cache.start == 0

        if isinstance(mask, BlockMask):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (bsz, heads, seqlen, head_dim)
            out = flex_attention_gqa(q, k, v, mask)
            return self.wo(out.transpose(1, 2).contiguous().view(bsz, seqlen, -1))

        # Grouped-query attention: each kv head serves n_rep query heads. SDPA's enable_gqa
        # shares them without copying K and V; on CUDA only the causal kernels (flash,
        # cuDNN) have it, while an explicit mask takes the memory-efficient kernel, which does
        # not (SDPA would fall back to the math kernel), so there K and V are repeated.
        n_rep = q.shape[2] // k.shape[2]
        gqa = n_rep > 1 and (mask is None or q.device.type != "cuda")
        if n_rep > 1 and not gqa:
            k = k.repeat_interleave(n_rep, dim=2)
            v = v.repeat_interleave(n_rep, dim=2)

        # (bsz, heads, seqlen, head_dim) for SDPA
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa
        )
        out = out.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, cfg: LlamaConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, *, kv_cache: KVCache | None = None):
        if kv_cache is None:
            h = x + self.attention(self.attention_norm(x), cos, sin, mask)
        else:
            layer_cache = kv_cache.layer(self.layer_id)
            h = x + self.attention(self.attention_norm(x), cos, sin, mask, kv_cache=layer_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Head(nn.Linear):
    """The output projection; given labels, it returns their cross entropy instead of the
    logits, computed chunk by chunk without holding all of them (`linear_cross_entropy`).

    The loss is computed inside this module's forward so that FSDP's hooks on it (gathering
    the weight, and its gradient's reduce-scatter) run as they do for the logits."""

    def forward(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        reduction: str = "mean",
        ignore_index: int = IGNORE_INDEX,
    ) -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        return linear_cross_entropy(
            x, self.weight, labels, reduction=reduction, ignore_index=ignore_index
        )


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask (bsz, 1, seqlen, seqlen): causal, and only within a document.

    document_ids: (bsz, seqlen) integers, equal for tokens of the same packed document.
    """
    seqlen = document_ids.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_doc & causal)[:, None]


def document_block_mask(document_ids: torch.Tensor, *, compiled: bool | None = None) -> BlockMask:
    """The FlexAttention BlockMask of `document_causal_mask`: causal, and only within a
    document, for every head (H=None broadcasts, so a tensor-parallel shard's local heads use
    it as it is).

    It keeps, per 128 x 128 tile, whether the tile is empty, full or partial (and then
    evaluates the mask function on it). `compiled` (default: on CUDA) builds it with the
    compiled create_block_mask, which evaluates the tiles without a dense mask; eager
    create_block_mask evaluates every (query, key) pair into a (bsz, 1, seq, seq) tensor first.
    """
    bsz, seqlen = document_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (q_idx >= kv_idx)

    if compiled is None:
        compiled = document_ids.device.type == "cuda"
    build = _compiled(create_block_mask) if compiled else create_block_mask
    return build(mask_mod, bsz, None, seqlen, seqlen, device=document_ids.device)


def set_attention_backend(model: Llama, backend: str) -> None:
    """Choose how `model` keeps packed documents apart: "sdpa" (dense mask) or "flex"
    (FlexAttention BlockMask; forward only on CPU in torch 2.13). See `ATTENTION_BACKENDS`."""
    model.set_attention_backend(backend)


def param_seed(seed: int, name: str) -> int:
    """A generator seed per parameter, from its name: init does not depend on module order."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keeps the names `layers.N` stable when a stage drops some layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # The next-token head (vocab_size rows) or, with cfg.output_dim, e.g. a reward score.
        self.output = Head(cfg.dim, cfg.output_width, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        # Not persistent: derived from the config, recomputed by init_weights after to_empty.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # A run setting, not model shape: chosen by the job (`set_attention_backend`).
        self.attention_backend = "sdpa"
        # Whether `forward(labels=...)` computes the loss in the head, chunk by chunk; off
        # under tensor parallelism, whose vocab-sharded logits go to the loss-parallel softmax.
        self.fused_loss = True

    def set_attention_backend(self, backend: str) -> None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}; "
                "use sdpa (dense document mask) or flex (FlexAttention)"
            )
        self.attention_backend = backend

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits (bsz, seqlen, vocab_size) for tokens (bsz, seqlen); with labels (bsz,
        seqlen; IGNORE_INDEX where there is nothing to predict), their fp32 cross entropy
        instead: the mean or sum over labelled tokens, or per token (flattened) with
        reduction="none". The mean and the sum never hold all logits (`Head`); under tensor
        parallelism, call it under `llama_dist.parallel.loss_context`.

        position_ids (bsz, seqlen): rotary positions, e.g. restarting at each packed document;
        default 0..seqlen-1. document_ids (bsz, seqlen): when given, attention stays within a
        document (a block-diagonal causal mask; `attention_backend` says whether dense or a
        FlexAttention BlockMask, one for all layers); by default attention is plainly causal.

        kv_cache (from `new_kv_cache`): tokens are the ones after those already cached, whose
        keys and values are appended; the default positions continue from `kv_cache.length`,
        and new tokens attend to the cached ones too. Without document_ids, new tokens belong
        to the document of their row's last cached token.
        """
        if kv_cache is not None:
            return self._forward_cached(tokens, position_ids, document_ids, kv_cache)
        seqlen = tokens.shape[1]
        if position_ids is None:
            if seqlen > self.cfg.max_seq_len:
                raise ValueError(
                    f"sequence of {seqlen} tokens is longer than model.max_seq_len="
                    f"{self.cfg.max_seq_len}; raise max_seq_len"
                )
            cos, sin = self.rope_cos[:seqlen], self.rope_sin[:seqlen]
        else:
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        mask: torch.Tensor | BlockMask | None = None
        if document_ids is not None and self.attention_backend == "flex":
            mask = document_block_mask(document_ids)
        elif document_ids is not None:
            mask = document_causal_mask(document_ids)

        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        h = self.norm(h)
        if labels is None:
            return self.output(h)
        if not self.cfg.is_lm_head:
            raise ValueError("labels are for a next-token head; this model has output_dim set")
        if self.fused_loss and reduction != "none":
            return self.output(h, labels, reduction=reduction)
        return cross_entropy_loss(self.output(h), labels, reduction=reduction)

    def _forward_cached(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None,
        document_ids: torch.Tensor | None,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        start, end = kv_cache.length, kv_cache.length + seqlen
        if bsz != kv_cache.batch_size:
            raise ValueError(
                f"a batch of {bsz} sequences does not fit a KV cache made for batch_size="
                f"{kv_cache.batch_size}; make the cache with new_kv_cache({bsz}, max_len)"
            )
        if end > kv_cache.max_len:
            raise ValueError(
                f"{seqlen} new tokens after {start} cached ones exceed the KV cache's max_len="
                f"{kv_cache.max_len}; make the cache with max_len >= {end} (prompt length "
                "plus the tokens to generate)"
            )
        if position_ids is None:
            if end > self.cfg.max_seq_len:
                raise ValueError(
                    f"positions up to {end - 1} are beyond model.max_seq_len="
                    f"{self.cfg.max_seq_len}; generate fewer tokens or raise max_seq_len"
                )
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        else:
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        mask = kv_cache.attention_mask(seqlen, document_ids)

        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask, kv_cache=kv_cache)
        # Advanced only once every layer has written its keys and values.
        kv_cache.length = end
        return self.output(self.norm(h))

    def new_kv_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty `KVCache` for `batch_size` sequences of up to `max_len` tokens, in the
        dtype and on the device of the embedding weights unless given."""
        weight = self.tok_embeddings.weight
        layer_ids = [layer.layer_id for layer in self.layers.values()]
        return KVCache(
            layer_ids,
            batch_size,
            max_len,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            dtype=weight.dtype if dtype is None else dtype,
            device=weight.device if device is None else device,
        )

    # Initialisation --------------------------------------------------------------------------
    def param_init_std(self) -> dict[str, float | None]:
        """Normal std of every parameter by name; None means ones (the norm weights).

        Residual-branch outputs (wo, w2) shrink with depth, as in GPT-2 / torchtitan.
        """
        specs: dict[str, float | None] = {}
        for name, _ in self.named_parameters():
            if name.endswith("norm.weight"):
                specs[name] = None
            elif name.startswith("tok_embeddings"):
                specs[name] = 1.0
            elif name.startswith("output") and self.cfg.is_lm_head:
                specs[name] = self.cfg.dim**-0.5
            elif name.startswith("output"):
                # A scalar (reward) head takes transformers' initializer_range, as its
                # LlamaForSequenceClassification does: a reward model started here begins like
                # one started there, and the head is the only fresh tensor either way.
                specs[name] = 0.02
            elif name.endswith(("wo.weight", "w2.weight")):
                layer_id = int(name.split(".")[1])
                specs[name] = 0.02 / math.sqrt(2 * (layer_id + 1))
            else:
                specs[name] = 0.02
        return specs

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init from `seed`: each parameter from its own named generator."""
        stds = self.param_init_std()
        for name, param in self.named_parameters():
            init_param_(param, stds[name], seed=seed, name=name)
        self.reset_rope()

    @torch.no_grad()
    def reset_rope(self) -> None:
        cfg = self.cfg
        device = self.rope_cos.device
        cos, sin = rope_tables(
            cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling, device=device
        )
        self.rope_cos, self.rope_sin = cos, sin


@torch.no_grad()
def init_param_(tensor: torch.Tensor, std: float | None, *, seed: int, name: str) -> None:
    """Fill a full (unsharded) tensor as `Llama.init_weights` does for parameter `name`."""
    if std is None:
        tensor.fill_(1.0)
        return
    gen = torch.Generator(device=tensor.device).manual_seed(param_seed(seed, name))
    values = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
    values.normal_(0.0, std, generator=gen)
    tensor.copy_(values)
