"""The Llama 2 model: presets, validation, rotary, GQA, packing, init."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from llama_dist.models import Llama, LlamaConfig, RopeScaling, get_preset
from llama_dist.models.llama import apply_rotary, rope_tables

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "llama_dist"

# ../shared/docs/llama2.md, "Architecture": exact parameters and FFN hidden sizes.
PAPER = {
    "7b": (6_738_415_616, 11008),
    "13b": (13_015_864_320, 13824),
    "34b": (33_743_970_304, 22016),
    "70b": (68_976_648_192, 28672),
}


def tiny_cfg(**overrides) -> LlamaConfig:
    base = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64
    )
    base.update(overrides)
    return LlamaConfig(**base).validate()


def build(cfg: LlamaConfig, seed: int = 0) -> Llama:
    model = Llama(cfg)
    model.init_weights(seed)
    return model


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_have_exact_parameter_counts_on_meta(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = Llama(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count == PAPER[name][0]
    assert cfg.num_params() == PAPER[name][0]
    assert cfg.hidden_dim == PAPER[name][1]
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    "name,low,high", [("debug", 0.5e6, 1.5e6), ("tiny", 10e6, 20e6), ("small", 70e6, 130e6)]
)
def test_small_presets_sizes(name, low, high):
    cfg = get_preset(name)
    with torch.device("meta"):
        count = sum(p.numel() for p in Llama(cfg).parameters())
    assert count == cfg.num_params()
    assert low <= count <= high


def test_gqa_presets():
    assert get_preset("70b").num_kv_heads == 8 and get_preset("34b").num_kv_heads == 8
    assert get_preset("7b").num_kv_heads == 32 and get_preset("13b").num_kv_heads == 40


def test_every_field_can_be_overridden():
    cfg = get_preset(
        "7b",
        n_layers=2,
        ffn_hidden_dim=1000,
        rope_theta=5e5,
        vocab_size=100,
        max_seq_len=8192,
        rope_scaling=RopeScaling("linear", 2.0),
    )
    assert cfg.hidden_dim == 1000 and cfg.n_layers == 2 and cfg.rope_theta == 5e5
    assert cfg.rope_scaling.kind == "linear"
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.layers["0"].feed_forward.w1.weight.shape == (1000, 4096)
    # The preset table itself is untouched.
    assert get_preset("7b").n_layers == 32


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: get_preset("8b"), "unknown model preset '8b'.*choose one of"),
        (lambda: tiny_cfg(dim=66), "not divisible by model.n_heads"),
        (lambda: tiny_cfg(n_kv_heads=3), "not divisible by model.n_kv_heads=3"),
        (lambda: tiny_cfg(n_heads=8, dim=8 * 3), "must be even"),
        (lambda: tiny_cfg(n_layers=0), "n_layers=0 must be a positive integer"),
        (lambda: tiny_cfg(rope_scaling=RopeScaling("yarn", 4.0)), "not supported"),
        (lambda: tiny_cfg(rope_scaling={"kind": "linear", "factor": 0.5}), "must be >= 1"),
        (lambda: LlamaConfig.from_dict({"dim": 64, "hiden": 3}), r"unknown model config keys"),
    ],
)
def test_bad_config_is_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def imported_modules(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            names.add("torch.distributed")  # torch.distributed.* used without an import
    return names


def test_models_package_does_not_import_torch_distributed():
    paths = list((SRC / "models").rglob("*.py"))
    assert len(paths) >= 3
    for path in paths:
        bad = [m for m in imported_modules(path) if m.startswith("torch.distributed")]
        assert not bad, f"{path} imports {bad}"


def test_init_is_deterministic_and_works_from_meta():
    cfg = tiny_cfg()
    a = build(cfg, seed=3)
    with torch.device("meta"):
        b = Llama(cfg)
    b.to_empty(device="cpu")
    b.init_weights(seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.rope_cos, b.rope_cos) and torch.equal(a.rope_sin, b.rope_sin)
    c = build(cfg, seed=4)
    assert not torch.equal(a.layers["0"].attention.wq.weight, c.layers["0"].attention.wq.weight)
    # Norm weights start at one; the residual-branch outputs are scaled down with depth.
    assert torch.equal(a.norm.weight, torch.ones(cfg.dim))
    assert a.layers["1"].attention.wo.weight.std() < a.layers["1"].attention.wq.weight.std()


def meta_rotary_reference(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's llama/model.py: precompute_freqs_cis + apply_rotary_emb with complex numbers."""
    bsz, seqlen, heads, head_dim = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    freqs = torch.outer(torch.arange(seqlen).float(), freqs)
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
    x_ = torch.view_as_complex(x.float().reshape(bsz, seqlen, heads, -1, 2))
    return torch.view_as_real(x_ * freqs_cis[None, :, None, :]).flatten(3)


def test_rotary_matches_meta_complex_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 3, 16)
    cos, sin = rope_tables(16, 10, 500.0, RopeScaling())
    torch.testing.assert_close(apply_rotary(x, cos, sin), meta_rotary_reference(x, 500.0))


def test_rotary_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    cos, sin = rope_tables(32, 64, 10000.0, RopeScaling())

    def score(i, j):
        qi = apply_rotary(q, cos[i : i + 1], sin[i : i + 1])
        kj = apply_rotary(k, cos[j : j + 1], sin[j : j + 1])
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_linear_rope_scaling_interpolates_positions():
    cos1, sin1 = rope_tables(16, 32, 10000.0, RopeScaling())
    cos2, sin2 = rope_tables(16, 64, 10000.0, RopeScaling("linear", 2.0))
    torch.testing.assert_close(cos2[::2], cos1)
    torch.testing.assert_close(sin2[::2], sin1)


def test_causal_future_tokens_do_not_change_past_logits():
    cfg = tiny_cfg()
    model = build(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % cfg.vocab_size
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_explicit_positions_equal_default():
    cfg = tiny_cfg()
    model = build(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    torch.testing.assert_close(model(tokens), model(tokens, position_ids=positions))


def test_packed_documents_with_mask_equal_separate_runs():
    cfg = tiny_cfg()
    model = build(cfg)
    gen = torch.Generator().manual_seed(1)
    doc_a = torch.randint(0, cfg.vocab_size, (1, 7), generator=gen)
    doc_b = torch.randint(0, cfg.vocab_size, (1, 5), generator=gen)
    packed = torch.cat([doc_a, doc_b], dim=1)
    document_ids = torch.tensor([[0] * 7 + [1] * 5])
    positions = torch.tensor([list(range(7)) + list(range(5))])
    out = model(packed, position_ids=positions, document_ids=document_ids)
    torch.testing.assert_close(out[:, :7], model(doc_a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 7:], model(doc_b), atol=1e-5, rtol=1e-5)
    # Without the mask the second document sees the first.
    leaky = model(packed, position_ids=positions)
    assert not torch.allclose(leaky[:, 7:], model(doc_b), atol=1e-3)


def test_gqa_equals_multi_head_with_repeated_kv_heads():
    gqa_cfg = tiny_cfg(n_heads=4, n_kv_heads=2)
    mha_cfg = tiny_cfg(n_heads=4, n_kv_heads=4)
    gqa = build(gqa_cfg)
    mha = Llama(mha_cfg)
    state = gqa.state_dict()
    head_dim = gqa_cfg.head_dim
    for name in list(state):
        if name.endswith(("wk.weight", "wv.weight")):
            w = state[name].view(gqa_cfg.num_kv_heads, head_dim, gqa_cfg.dim)
            state[name] = w.repeat_interleave(2, dim=0).reshape(-1, gqa_cfg.dim)
    mha.load_state_dict(state)
    tokens = torch.randint(0, gqa_cfg.vocab_size, (2, 9))
    torch.testing.assert_close(gqa(tokens), mha(tokens))


def test_gqa_shares_kv_heads_without_copying_them(monkeypatch):
    # On CPU SDPA's enable_gqa serves the query heads of each kv head, causal or masked.
    model = build(tiny_cfg(n_heads=4, n_kv_heads=2))
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9))
    documents = torch.tensor([[0] * 4 + [1] * 5] * 2)
    expected = model(tokens), model(tokens, document_ids=documents)

    def copy_refused(*args, **kwargs):
        raise AssertionError("K/V heads were repeated")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", copy_refused)
    torch.testing.assert_close(model(tokens), expected[0])
    torch.testing.assert_close(model(tokens, document_ids=documents), expected[1])


def test_too_long_sequence_is_a_clear_error():
    cfg = tiny_cfg(max_seq_len=8)
    with pytest.raises(ValueError, match="longer than model.max_seq_len=8"):
        build(cfg)(torch.zeros(1, 9, dtype=torch.long))


def test_backward_reaches_every_parameter():
    cfg = tiny_cfg()
    model = build(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
