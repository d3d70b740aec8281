"""HF `LlamaForCausalLM` <-> llama_dist conversion: names, rotary permutation, configs, folders.

The logits checks run both models in fp32 on tiny random configs (with and without GQA, an FFN
width off the 8/3 rule, non-default rope_theta, linear rope scaling) and compare them against
transformers' own implementation.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from llama_dist.models import Llama, LlamaConfig, RopeScaling
from llama_dist.models.hf_adapter import (
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    load_hf_folder,
    save_hf_folder,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")

TOL = 1e-4

CASES = {
    "mha": dict(n_heads=4, n_kv_heads=4, rope_theta=5000.0),
    "gqa": dict(n_heads=4, n_kv_heads=2, rope_theta=20000.0),
    "mqa": dict(n_heads=4, n_kv_heads=1, rope_theta=500000.0),
    "linear-rope": dict(
        n_heads=4,
        n_kv_heads=2,
        rope_theta=50000.0,
        rope_scaling=RopeScaling(kind="linear", factor=2.0),
    ),
}


def tiny_config(case: str) -> LlamaConfig:
    # ffn_hidden_dim 200 is off the multiple_of rule, so intermediate_size must travel explicitly.
    return LlamaConfig(
        dim=64,
        n_layers=2,
        vocab_size=256,
        ffn_hidden_dim=200,
        norm_eps=1e-5,
        max_seq_len=128,
        **CASES[case],
    ).validate()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter, norms included, so a swapped name cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("norm.weight") or "layernorm" in name:
            param.copy_(1.0 + 0.2 * noise)
        elif "embed" in name:
            param.copy_(noise)
        else:
            param.copy_(noise / param.shape[-1] ** 0.5)


def hf_model_from_transformers(cfg: LlamaConfig, seed: int):
    """A random HF model whose config is built by transformers itself, not by config_to_hf."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.kind == "linear":
        rope = {
            "rope_type": "linear",
            "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_scaling.factor,
        }
    hf_cfg = transformers.LlamaConfig(
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.num_kv_heads,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters=rope,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    randomize_(model, seed)
    return model


def our_model(cfg: LlamaConfig, seed: int) -> Llama:
    model = Llama(cfg)
    model.init_weights(seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            # init_weights sets norms to ones: perturb them so that swapped names show.
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
            # At init scale attention is nearly uniform and hides rotary mistakes; sharpen it.
            if name.endswith(("wq.weight", "wk.weight")):
                param.mul_(10.0)
    return model.eval()


def inputs(cfg: LlamaConfig, seed: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Token batches: short default positions, a full-length sequence, and shifted positions."""
    gen = torch.Generator().manual_seed(seed)
    short = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen)
    full = torch.randint(0, cfg.vocab_size, (1, cfg.max_seq_len), generator=gen)
    shifted = torch.randint(0, cfg.vocab_size, (2, 48), generator=gen)
    offsets = torch.tensor([[30], [cfg.max_seq_len - 48]])
    return [(short, None), (full, None), (shifted, torch.arange(48)[None] + offsets)]


@torch.no_grad()
def max_logit_diff(ours: Llama, hf, cfg: LlamaConfig, seed: int) -> float:
    worst = 0.0
    for tokens, positions in inputs(cfg, seed):
        expected = hf(input_ids=tokens, position_ids=positions).logits
        got = ours(tokens, position_ids=positions)
        assert got.shape == expected.shape
        worst = max(worst, (got - expected).abs().max().item())
    return worst


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_ours_logits_match(case):
    cfg = tiny_config(case)
    hf = hf_model_from_transformers(cfg, seed=1)

    converted_cfg = config_from_hf(hf.config.to_dict())
    assert converted_cfg == cfg
    model = Llama(converted_cfg).eval()
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), converted_cfg), strict=True)

    assert max_logit_diff(model, hf, cfg, seed=2) < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_hf_folder_loads_in_transformers(case, tmp_path):
    cfg = tiny_config(case)
    model = our_model(cfg, seed=3)
    # The GQA case also goes through a sharded folder.
    max_shard_bytes = 100_000 if case == "gqa" else 5 * 2**30
    out = save_hf_folder(model.state_dict(), cfg, tmp_path / "hf", max_shard_bytes=max_shard_bytes)
    assert (out / "model.safetensors.index.json").is_file() == (case == "gqa")

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.dtype == torch.float32
    expected_rope = {
        "rope_type": cfg.rope_scaling.kind.replace("none", "default"),
        "rope_theta": cfg.rope_theta,
    }
    if cfg.rope_scaling.kind == "linear":
        expected_rope["factor"] = cfg.rope_scaling.factor
    assert {k: hf.config.rope_parameters[k] for k in expected_rope} == expected_rope

    assert max_logit_diff(model, hf, cfg, seed=4) < TOL


def test_transformers_reads_written_config_without_warnings(tmp_path, recwarn):
    cfg = tiny_config("linear-rope")
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg, torch.bfloat16)))
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    assert hf_cfg.dtype == torch.bfloat16
    assert hf_cfg.rope_parameters == {"rope_type": "linear", "rope_theta": 50000.0, "factor": 2.0}
    assert hf_cfg.head_dim == 16 and hf_cfg.intermediate_size == 200
    assert not [w for w in recwarn if "rope" in str(w.message).lower()]


@pytest.mark.parametrize("case", ["mha", "mqa", "linear-rope"])
def test_config_round_trip(case):
    cfg = tiny_config(case)
    assert config_from_hf(config_to_hf(cfg)) == cfg


def test_config_from_legacy_transformers4_keys():
    hf = config_to_hf(tiny_config("gqa"))
    del hf["rope_parameters"]
    hf["rope_theta"] = 1e6
    hf["rope_scaling"] = {"type": "linear", "factor": 4.0}  # the pre-"rope_type" spelling
    cfg = config_from_hf(hf)
    assert cfg.rope_theta == 1e6
    assert cfg.rope_scaling == RopeScaling(kind="linear", factor=4.0)

    del hf["rope_theta"], hf["rope_scaling"]
    assert config_from_hf(hf).rope_theta == 10000.0


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        (
            "rope_parameters",
            {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0},
            "rope_type='llama3'",
        ),
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_type='dynamic'"),
        ("head_dim", 32, "head_dim=32"),
        ("tie_word_embeddings", True, "tie_word_embeddings=True"),
        ("attention_bias", True, "attention_bias=True"),
        ("mlp_bias", True, "mlp_bias=True"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("model_type", "mistral", "Llama models only"),
        ("architectures", ["LlamaModel"], "Llama models only"),
        ("intermediate_size", None, "intermediate_size"),
    ],
)
def test_config_from_hf_rejects_unsupported(field, value, match):
    hf = config_to_hf(tiny_config("gqa"))
    hf[field] = value
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


@pytest.mark.parametrize("case", ["gqa", "mqa"])
def test_state_dict_round_trip_is_bitwise(case):
    cfg = tiny_config(case)
    sd = our_model(cfg, seed=5).state_dict()
    hf_sd = to_hf_state_dict(sd, cfg)
    assert "model.layers.1.self_attn.k_proj.weight" in hf_sd and "lm_head.weight" in hf_sd
    # wq really is permuted (pairs -> halves), and only the rows of each head move.
    wq, hf_wq = sd["layers.0.attention.wq.weight"], hf_sd["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(wq, hf_wq)
    assert torch.equal(hf_wq[1], wq[2]) and torch.equal(hf_wq[cfg.head_dim // 2], wq[1])

    back = from_hf_state_dict(hf_sd, cfg)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_folder_round_trip_is_bitwise(tmp_path, dtype):
    cfg = tiny_config("gqa")
    sd = our_model(cfg, seed=6).state_dict()
    out = save_hf_folder(sd, cfg, tmp_path / "hf", dtype=dtype, max_shard_bytes=60_000)
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "generation_config.json" in names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    # Written beside the output under a temporary name, and nothing of it left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]

    cfg_back, back = load_hf_folder(out)
    assert cfg_back == cfg
    for key, tensor in sd.items():
        expected = tensor if dtype is None else tensor.to(dtype)
        assert back[key].dtype == expected.dtype and torch.equal(back[key], expected), key
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def test_pytorch_bin_fallback_and_inv_freq_buffers(tmp_path):
    cfg = tiny_config("mha")
    sd = our_model(cfg, seed=7).state_dict()
    hf_sd = to_hf_state_dict(sd, cfg)
    hf_sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(cfg.head_dim // 2)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    torch.save(hf_sd, tmp_path / "pytorch_model.bin")
    _, back = load_hf_folder(tmp_path)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pytorch_bin_is_never_unpickled(tmp_path):
    marker = tmp_path / "was-unpickled"
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(tiny_config("mha"))))
    torch.save({"model.norm.weight": _Exploit(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not unpickled"):
        load_hf_folder(tmp_path)
    assert not marker.exists()


def _hf_folder(tmp_path, cfg: LlamaConfig, hf_sd: dict[str, torch.Tensor]):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    save_file(hf_sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_bad_hf_folders(tmp_path):
    cfg = tiny_config("gqa")
    hf_sd = to_hf_state_dict(our_model(cfg, seed=8).state_dict(), cfg)

    with pytest.raises(ValueError, match="does not exist"):
        load_hf_folder(tmp_path / "nowhere")

    with pytest.raises(ValueError, match="no config.json"):
        load_hf_folder(tmp_path)

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64})
    )
    with pytest.raises(ValueError, match="this converts Llama models only"):
        load_hf_folder(gpt2)

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    with pytest.raises(ValueError, match="holds no weights"):
        load_hf_folder(no_weights)

    missing = dict(hf_sd)
    del missing["model.layers.1.mlp.up_proj.weight"]
    (tmp_path / "missing").mkdir()
    with pytest.raises(ValueError, match=r"missing 1 tensors \(model.layers.1.mlp.up_proj.weight"):
        load_hf_folder(_hf_folder(tmp_path / "missing", cfg, missing))

    extra = dict(hf_sd)
    extra["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(cfg.dim)
    extra["model.layers.2.mlp.up_proj.weight"] = torch.zeros(cfg.hidden_dim, cfg.dim)
    (tmp_path / "extra").mkdir()
    with pytest.raises(ValueError, match=r"unexpected 2 tensors \(model.layers.0.self_attn.q_proj"):
        load_hf_folder(_hf_folder(tmp_path / "extra", cfg, extra))

    wrong = dict(hf_sd)
    wrong["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(cfg.dim, cfg.dim)
    with pytest.raises(ValueError, match="wrong shape.*k_proj"):
        from_hf_state_dict(wrong, cfg)


def test_state_dict_mismatches_are_value_errors():
    cfg = tiny_config("mha")
    sd = our_model(cfg, seed=9).state_dict()
    del sd["output.weight"]
    sd["layers.0.attention.wq.bias"] = torch.zeros(cfg.dim)
    with pytest.raises(ValueError, match=r"missing 1 tensors \(output.weight\).*unexpected"):
        to_hf_state_dict(sd, cfg)


def test_save_refuses_non_empty_output(tmp_path):
    cfg = tiny_config("mha")
    sd = our_model(cfg, seed=10).state_dict()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="pick another --out or delete it"):
        save_hf_folder(sd, cfg, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]

    mixed = dict(sd)
    mixed["norm.weight"] = mixed["norm.weight"].half()
    with pytest.raises(ValueError, match="mixes dtypes"):
        save_hf_folder(mixed, cfg, tmp_path / "mixed")
    # An existing empty folder is fine.
    (tmp_path / "empty").mkdir()
    save_hf_folder(sd, cfg, tmp_path / "empty")
