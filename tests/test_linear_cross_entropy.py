"""The chunked head + cross entropy against the logits path it replaces."""

from __future__ import annotations

import pytest
import torch

from llama_dist.losses import IGNORE_INDEX, cross_entropy_loss, linear_cross_entropy
from llama_dist.models import Llama, LlamaConfig


def _inputs(n=37, d=24, v=101, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=gen) * 0.3).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen)
    y[::5] = IGNORE_INDEX
    return h, w, y


def _reference(h, w, y, reduction, scale=1.0):
    """Loss and gradients of the logits path (for the loss times `scale`)."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = cross_entropy_loss((h @ w.t())[None], y[None], reduction=reduction)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_tokens", [1, 8, 37, 1000])
def test_loss_and_gradients_equal_the_logits_path(reduction, chunk_tokens):
    h, w, y = _inputs()
    ref_loss, ref_gh, ref_gw = _reference(h, w, y, reduction, scale=0.37)
    # chunk_bytes counts fp32 logits: 4 bytes x vocab per token.
    loss = linear_cross_entropy(h, w, y, reduction=reduction, chunk_bytes=4 * 101 * chunk_tokens)
    (loss * 0.37).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-5, atol=1e-7)


def test_bf16_matches_the_logits_path_and_keeps_dtypes():
    h, w, y = _inputs(n=64, dtype=torch.bfloat16)
    ref_loss, ref_gh, ref_gw = _reference(h, w, y, "sum")
    loss = linear_cross_entropy(h, w, y, reduction="sum", chunk_bytes=4 * 101 * 16)
    loss.backward()
    assert loss.dtype == torch.float32
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.float(), ref_gh.float(), rtol=2e-2, atol=2e-3)
    # The weight's gradient is summed over chunks in fp32: as close to the exact value as
    # the logits path's single matmul.
    exact = _reference(h.double(), w.double(), y, "sum")[2]
    err = (w.grad.double() - exact).abs().max()
    ref_err = (ref_gw.double() - exact).abs().max()
    assert err <= 1.5 * ref_err + 1e-3


def test_only_some_inputs_need_gradients():
    h, w, y = _inputs()
    ref_loss, ref_gh, _ = _reference(h, w, y, "mean")
    w_frozen = w.detach()
    loss = linear_cross_entropy(h, w_frozen, y, chunk_bytes=4 * 101 * 8)
    loss.backward()
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y), ref_loss)


def test_every_label_ignored():
    h, w, y = _inputs()
    y[:] = IGNORE_INDEX
    loss = linear_cross_entropy(h, w, y, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0
    assert not h.grad.any() and not w.grad.any()
    # As F.cross_entropy: the mean over no tokens is nan.
    assert linear_cross_entropy(h, w, y).isnan()


def test_misuse_is_named():
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="mean or sum"):
        linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="37 hidden states for 36 labels"):
        linear_cross_entropy(h, w, y[:-1])
    loss = linear_cross_entropy(h, w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_model_with_labels_equals_its_logits_then_the_loss(reduction):
    cfg = LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64
    ).validate()
    model = Llama(cfg)
    model.init_weights(0)
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    labels = tokens[:, 1:].clone()
    labels[0, :4] = IGNORE_INDEX

    ref = cross_entropy_loss(model(tokens[:, :-1]), labels, reduction=reduction)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    loss = model(tokens[:, :-1], labels=labels, reduction=reduction)
    loss.sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
