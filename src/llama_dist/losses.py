"""Losses shared by the training loops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from llama_dist.host_memory import MMAP_THRESHOLD_MAX

IGNORE_INDEX = -100

# fp32 logits of at most this many bytes exist at once in `linear_cross_entropy`. On GPUs 256
# MiB: 2,097 tokens of a 32k vocabulary, 4 chunks for a 7B micro-batch of 2 x 4096 tokens. On
# CPUs 32 MiB, the largest block glibc keeps for reuse (`llama_dist.host_memory`): a chunk's
# buffers then come without page faults, and stay in cache better (the softmax of 256 tokens
# of 32k takes 2 ms there, of 512 tokens 21 ms).
LOSS_CHUNK_BYTES = {"cpu": MMAP_THRESHOLD_MAX}
DEFAULT_LOSS_CHUNK_BYTES = 256 * 2**20


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross entropy in fp32: the mean over labelled tokens, or per token
    (flattened) with reduction="none".

    logits (bsz, seqlen, vocab) may be a vocab-sharded DTensor: call this under
    `llama_dist.parallel.loss_context` so the softmax is computed without gathering them.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=ignore_index,
        reduction=reduction,
    )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """`cross_entropy_loss(hidden @ weight.T, labels)` (fp32 softmax, reduction "mean" or
    "sum") without holding the logits of all tokens.

    The tokens go through the head a chunk at a time (fp32 logits of at most `chunk_bytes`;
    by default `LOSS_CHUNK_BYTES` of the device type).
    When gradients are wanted they are computed in the same pass: each chunk's log-softmax
    turns in place into softmax - one-hot, which gives that chunk's input gradient and adds to
    the weight's. The backward then only scales them. Against the unfused head this saves
    holding the logits, their fp32 copy, the log-softmax kept for backward and its gradient
    (buffers of tokens x vocab) and a pass over them; in bf16 the weight's gradient is summed
    over chunks in fp32.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: linear_cross_entropy computes mean or sum")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden states for {y.shape[0]} labels")
    if chunk_bytes is None:
        chunk_bytes = LOSS_CHUNK_BYTES.get(h.device.type, DEFAULT_LOSS_CHUNK_BYTES)
    chunk = max(1, chunk_bytes // (4 * weight.shape[0]))
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, y, ignore_index, reduction, chunk)
    with torch.no_grad():
        return _chunked_loss(h, weight, y, ignore_index, reduction, chunk)[0]


def _chunked_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk: int,
    *,
    want_h: bool = False,
    want_w: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, input gradient, weight gradient); the gradients only where wanted."""
    valid = y != ignore_index
    target = torch.where(valid, y, 0)
    count = valid.sum()
    # Mean over labelled tokens: as F.cross_entropy, nan when there are none.
    scale = 1.0 / count.float() if reduction == "mean" else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if want_h else None
    grad_w = None
    several = h.shape[0] > chunk
    for start in range(0, h.shape[0], chunk):
        rows = slice(start, start + chunk)
        h_c, t_c, v_c = h[rows], target[rows, None], valid[rows, None]
        logp = torch.log_softmax((h_c @ weight.t()).float(), dim=-1)
        total -= (logp.gather(1, t_c) * v_c).sum()
        if not (want_h or want_w):
            continue
        # softmax - one-hot on labelled rows, zero on the others, times 1/count for the mean.
        weights = v_c.float() if scale is None else v_c * scale
        g = logp.exp_().mul_(weights)
        g.scatter_add_(1, t_c, -weights)
        g = g.to(h.dtype)
        del logp
        if want_h:
            torch.mm(g, weight, out=grad_h[rows])
        if want_w:
            if grad_w is None:
                grad_w = g.t() @ h_c
                # Summed over chunks in fp32 (in place where the dtype allows).
                grad_w = grad_w.float() if several else grad_w
            elif grad_w.dtype == g.dtype:
                grad_w.addmm_(g.t(), h_c)
            else:
                grad_w += g.t() @ h_c
    loss = total if scale is None else total * scale
    return loss, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, y, ignore_index, reduction, chunk):
        loss, grad_h, grad_w = _chunked_loss(
            h,
            weight,
            y,
            ignore_index,
            reduction,
            chunk,
            want_h=ctx.needs_input_grad[0],
            want_w=ctx.needs_input_grad[1],
        )
        ctx.grads = (grad_h, grad_w)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy computes its gradients for one backward; "
                "recompute the loss instead of retaining its graph"
            )
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None
