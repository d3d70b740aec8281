"""FlexAttention for packed documents: its forward against the dense-mask SDPA reference on CPU
(torch 2.13 has no FlexAttention backward on CPU), per-document equality, no dense mask, and
the backend choice of the job config."""

from __future__ import annotations

import time

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from llama_dist.config import ModelConfig
from llama_dist.models import Llama, LlamaConfig
from llama_dist.models import llama as llama_module
from llama_dist.models.llama import document_block_mask, set_attention_backend
from llama_dist.testing.distributed import run_distributed

SEQ = 200  # not a multiple of FlexAttention's 128-token tiles
# Row 0: a document crossing the tile boundary at 128, one of a single token, and the last
# document ending the row. Row 1: one document of 128 tokens (ending exactly on the tile
# boundary), then three more.
DOC_LENGTHS = ([60, 90, 1, 49], [128, 7, 1, 64])


def tiny_cfg(**overrides) -> LlamaConfig:
    # GQA: 4 query heads share 2 kv heads.
    base = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=256
    )
    base.update(overrides)
    return LlamaConfig(**base).validate()


def build(cfg: LlamaConfig, backend: str = "sdpa") -> Llama:
    model = Llama(cfg)
    model.init_weights(0)
    set_attention_backend(model, backend)
    return model


def packed_batch(lengths_per_row=DOC_LENGTHS, vocab: int = 97, seed: int = 0):
    """tokens, document_ids, position_ids (bsz, seq): positions restart in each document."""
    gen = torch.Generator().manual_seed(seed)
    docs, positions = [], []
    for lengths in lengths_per_row:
        assert sum(lengths) == SEQ
        docs.append(torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
    tokens = torch.randint(0, vocab, (len(lengths_per_row), SEQ), generator=gen)
    return tokens, torch.stack(docs), torch.stack(positions)


@pytest.fixture(scope="module")
def models():
    cfg = tiny_cfg()
    return build(cfg, "sdpa"), build(cfg, "flex")


def test_flex_forward_equals_dense_mask(models):
    dense, flex = models
    tokens, document_ids, position_ids = packed_batch()
    with torch.no_grad():
        ref = dense(tokens, position_ids=position_ids, document_ids=document_ids)
        out = flex(tokens, position_ids=position_ids, document_ids=document_ids)
        plain = dense(tokens, position_ids=position_ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The mask matters here: without it the same tokens give other logits.
    assert (plain - ref).abs().max() > 1e-2


def test_packed_documents_equal_each_document_alone(models):
    _, flex = models
    tokens, document_ids, position_ids = packed_batch()
    with torch.no_grad():
        packed = flex(tokens, position_ids=position_ids, document_ids=document_ids)
        for row, lengths in enumerate(DOC_LENGTHS):
            start = 0
            for n in lengths:
                alone = flex(tokens[row : row + 1, start : start + n])  # plain causal SDPA
                torch.testing.assert_close(
                    packed[row, start : start + n], alone[0], atol=1e-5, rtol=1e-5
                )
                start += n


def test_flex_builds_no_dense_mask_and_skips_sdpa(models, monkeypatch):
    _, flex = models
    tokens, document_ids, position_ids = packed_batch()

    def forbidden(*args, **kwargs):
        raise AssertionError("the flex path must not build a dense mask or call SDPA")

    monkeypatch.setattr(llama_module, "document_causal_mask", forbidden)
    monkeypatch.setattr(llama_module.F, "scaled_dot_product_attention", forbidden)
    seen: list[BlockMask] = []
    real_block_mask = llama_module.document_block_mask

    def recording(document_ids, **kwargs):
        seen.append(real_block_mask(document_ids, **kwargs))
        return seen[-1]

    monkeypatch.setattr(llama_module, "document_block_mask", recording)
    with torch.no_grad():
        flex(tokens, position_ids=position_ids, document_ids=document_ids)
    # One BlockMask per forward, shared by both layers, broadcast over heads.
    assert len(seen) == 1
    assert seen[0].kv_num_blocks.shape == (2, 1, 2)  # (bsz, heads, query tiles of 200 tokens)


def test_block_mask_matches_dense_mask():
    _, document_ids, _ = packed_batch()
    block_mask = document_block_mask(document_ids)
    dense = llama_module.document_causal_mask(document_ids)
    # The mask function at every (query, key) pair reproduces the dense mask exactly.
    q_idx = torch.arange(SEQ)[:, None]
    kv_idx = torch.arange(SEQ)[None, :]
    for b in range(2):
        pairs = block_mask.mask_mod(torch.tensor(b), torch.tensor(0), q_idx, kv_idx)
        assert torch.equal(pairs, dense[b, 0])
    # Row 0, tiles (query 1, key 0): document 1 crosses the boundary, so the tile is partial;
    # row 1: the first document ends at 128, so query tile 1 sees no key of tile 0.
    kv_blocks = block_mask.kv_num_blocks[:, 0].tolist()
    full_blocks = block_mask.full_kv_num_blocks[:, 0].tolist()
    assert [k + f for k, f in zip(kv_blocks[0], full_blocks[0], strict=True)] == [1, 2]
    assert [k + f for k, f in zip(kv_blocks[1], full_blocks[1], strict=True)] == [1, 1]


def test_kv_cache_generation_keeps_sdpa(models):
    dense, flex = models
    tokens, document_ids, position_ids = packed_batch()
    with torch.no_grad():
        caches = [m.new_kv_cache(2, SEQ) for m in (dense, flex)]
        ref, out = (
            m(tokens, position_ids=position_ids, document_ids=document_ids, kv_cache=c)
            for m, c in zip((dense, flex), caches, strict=True)
        )
    assert torch.equal(out, ref)


def test_flex_forward_under_per_block_compile():
    """The path a GPU run takes with per-block compile; forward only on CPU."""
    cfg = tiny_cfg()
    dense, flex = build(cfg, "sdpa"), build(cfg, "flex")
    for block in flex.layers.values():
        block.forward = torch.compile(block.forward)
    tokens, document_ids, position_ids = packed_batch()
    started = time.time()
    with torch.no_grad():
        ref = dense(tokens, position_ids=position_ids, document_ids=document_ids)
        out = flex(tokens, position_ids=position_ids, document_ids=document_ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert time.time() - started < 120


def tp_worker(sequence_parallel: bool) -> float:
    """Largest logit difference of the TP-sharded flex model from the unsharded dense one."""
    from torch.distributed.device_mesh import init_device_mesh

    from llama_dist.parallel.tp import apply_tp

    cfg = tiny_cfg()
    ref_model, model = build(cfg, "sdpa"), build(cfg, "flex")
    apply_tp(
        model,
        init_device_mesh("cpu", (2,)),
        sequence_parallel=sequence_parallel,
        loss_parallel=False,
    )
    tokens, document_ids, position_ids = packed_batch()
    with torch.no_grad():
        ref = ref_model(tokens, position_ids=position_ids, document_ids=document_ids)
        out = model(tokens, position_ids=position_ids, document_ids=document_ids)
    return (out - ref).abs().max().item()


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_flex_forward_under_tensor_parallel(sequence_parallel):
    # Each of the 2 ranks holds 2 query heads and 1 kv head; the BlockMask broadcasts over them.
    assert run_distributed(tp_worker, 2, sequence_parallel) < 1e-5


def test_backend_name_is_checked():
    model = build(tiny_cfg(n_layers=1))
    with pytest.raises(ValueError, match="'flash' is not one of"):
        set_attention_backend(model, "flash")
    assert model.attention_backend == "sdpa"


@pytest.mark.parametrize(
    ("attention", "device_type", "document_mask", "expected"),
    [
        ("auto", "cuda", True, "flex"),
        ("auto", "cuda", False, "sdpa"),
        ("auto", "cpu", True, "sdpa"),
        ("sdpa", "cuda", True, "sdpa"),
        ("flex", "cuda", False, "flex"),
    ],
)
def test_job_config_resolves_the_backend(attention, device_type, document_mask, expected):
    got = ModelConfig(attention=attention).resolve_attention(
        device_type=device_type, document_mask=document_mask
    )
    assert got == expected


def test_flex_training_on_cpu_is_refused():
    with pytest.raises(ValueError, match=r"model.attention=flex .* no backward on CPU.*sdpa"):
        ModelConfig(attention="flex").resolve_attention(device_type="cpu", document_mask=True)
    with pytest.raises(ValueError, match="model.attention='dense' must be auto, sdpa or flex"):
        ModelConfig(attention="dense").build()


def test_cpu_flex_has_no_backward(models):
    """Why CPU training keeps the dense mask: if torch gains the backward, revisit."""
    _, flex = models
    tokens, document_ids, position_ids = packed_batch()
    # Refused already in the forward, as soon as the inputs require gradients.
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex(tokens, position_ids=position_ids, document_ids=document_ids)
