"""Sampling with a KV cache: against full recomputation, padding, top-p, eos, loading, CLI.

The reference for every cached result is the model run on the whole sequence at each step,
one prompt at a time, without a cache.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_dist.checkpoint import save_model_checkpoint
from llama_dist.data.chat import encode_dialog
from llama_dist.generate import generate, load_for_generation, main, sample_next, stream
from llama_dist.models import Llama, LlamaConfig
from llama_dist.models.hf_adapter import save_hf_folder
from llama_dist.tokenizer import Tokenizer, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
HEADS = {"mha": 4, "gqa": 2}
# Different lengths, so a batch of them is padded.
PROMPTS = [[1, 5, 9], [1, 17, 33, 2, 40, 41, 7, 8, 60], [1], [1, 70, 71, 72, 73, 74]]


def tiny_cfg(n_kv_heads: int = 2, vocab_size: int = 97) -> LlamaConfig:
    return LlamaConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size,
        multiple_of=16,
        max_seq_len=64,
    ).validate()


def build(cfg: LlamaConfig, seed: int = 0) -> Llama:
    model = Llama(cfg)
    model.init_weights(seed)
    # At the init scale attention is nearly uniform and greedy tokens barely depend on context;
    # larger weights make a masking mistake change them.
    with torch.no_grad():
        for name, param in model.layers.named_parameters():
            if not name.endswith("norm.weight"):
                param.mul_(5.0)
    return model.eval()


@pytest.fixture(params=sorted(HEADS))
def model(request) -> Llama:
    return build(tiny_cfg(HEADS[request.param]))


@torch.no_grad()
def greedy_reference(
    model: Llama, prompt: list[int], max_new_tokens: int, eos_id: int | None = None
) -> list[int]:
    """Greedy decoding by running the whole sequence at every step."""
    seq, new = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([seq]))[0, -1].argmax())
        new.append(token)
        seq.append(token)
        if token == eos_id:
            break
    return new


# The model's KV cache -------------------------------------------------------------------------
@torch.no_grad()
def test_cached_logits_match_full_recompute(model):
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, model.cfg.vocab_size, (2, 20), generator=gen)
    full = model(seq)
    cache = model.new_kv_cache(2, 20)
    # A prefill, a chunk after cached tokens (explicit causal offset), then single tokens.
    chunks = [(0, 6), (6, 10), *((i, i + 1) for i in range(10, 20))]
    for start, end in chunks:
        logits = model(seq[:, start:end], kv_cache=cache)
        assert cache.length == end
        torch.testing.assert_close(logits, full[:, start:end], atol=ATOL, rtol=0)


@torch.no_grad()
def test_cached_logits_with_packed_documents(model):
    """Decoding continues the last packed document, with its own positions."""
    tokens = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6]])
    full = model(tokens, position_ids=position_ids, document_ids=document_ids)
    cache = model.new_kv_cache(1, 10)
    logits = model(
        tokens[:, :6],
        position_ids=position_ids[:, :6],
        document_ids=document_ids[:, :6],
        kv_cache=cache,
    )
    torch.testing.assert_close(logits, full[:, :6], atol=ATOL, rtol=0)
    for i in range(6, 10):
        logits = model(
            tokens[:, i : i + 1], position_ids=position_ids[:, i : i + 1], kv_cache=cache
        )
        torch.testing.assert_close(logits, full[:, i : i + 1], atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padded_batch_matches_each_prompt_alone(model):
    """Padding as a document of its own with positions from each row's first token."""
    longest = max(len(p) for p in PROMPTS)
    num_new = 5
    rows = [p + list(range(10, 10 + num_new)) for p in PROMPTS]
    tokens = torch.zeros(len(rows), longest + num_new, dtype=torch.long)
    position_ids = torch.zeros_like(tokens)
    document_ids = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        pad = longest - len(PROMPTS[i])
        tokens[i, pad:] = torch.tensor(row)
        position_ids[i, pad:] = torch.arange(len(row))
        document_ids[i, pad:] = 1
    cache = model.new_kv_cache(len(rows), longest + num_new)
    prefill = model(
        tokens[:, :longest],
        position_ids=position_ids[:, :longest],
        document_ids=document_ids[:, :longest],
        kv_cache=cache,
    )
    steps = [
        model(tokens[:, j : j + 1], position_ids=position_ids[:, j : j + 1], kv_cache=cache)
        for j in range(longest, longest + num_new)
    ]
    cached = torch.cat([prefill, *steps], dim=1)
    for i, row in enumerate(rows):
        alone = model(torch.tensor([row]))[0]
        pad = longest - len(PROMPTS[i])
        torch.testing.assert_close(cached[i, pad:], alone, atol=ATOL, rtol=0)


@torch.no_grad()
def test_prefill_equals_token_by_token_cache(model):
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 12), generator=torch.Generator())
    at_once, one_by_one = model.new_kv_cache(3, 16), model.new_kv_cache(3, 16)
    model(tokens, kv_cache=at_once)
    for i in range(tokens.shape[1]):
        model(tokens[:, i : i + 1], kv_cache=one_by_one)
    assert at_once.length == one_by_one.length == 12
    for layer_id in at_once.k:
        for a, b in ((at_once.k, one_by_one.k), (at_once.v, one_by_one.v)):
            assert a[layer_id].shape == (3, 16, model.cfg.num_kv_heads, model.cfg.head_dim)
            torch.testing.assert_close(a[layer_id], b[layer_id], atol=ATOL, rtol=0)


def test_cache_holds_kv_heads_in_model_dtype():
    model = build(tiny_cfg(n_kv_heads=2)).to(torch.bfloat16)
    cache = model.new_kv_cache(2, 8)
    assert set(cache.k) == {0, 1}
    assert cache.k[0].shape == (2, 8, 2, 16) and cache.k[0].dtype == torch.bfloat16


@torch.no_grad()
def test_cache_overflow_and_batch_mismatch_are_value_errors(model):
    cache = model.new_kv_cache(1, 8)
    model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_len=8; make the cache with max_len >= 9"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    assert cache.length == 6  # a refused call leaves the cache as it was
    model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="batch_size=1"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=model.new_kv_cache(1, 8))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long), kv_cache=model.new_kv_cache(1, 80))


# generate -------------------------------------------------------------------------------------
def test_greedy_matches_full_recompute(model):
    for prompt in PROMPTS:
        expected = greedy_reference(model, prompt, 12)
        assert generate(model, [prompt], max_new_tokens=12, temperature=0) == [expected]


def test_greedy_batch_of_different_lengths_matches_full_recompute(model):
    expected = [greedy_reference(model, p, 12) for p in PROMPTS]
    assert generate(model, PROMPTS, max_new_tokens=12, temperature=0) == expected
    # Equal lengths take the unpadded path.
    same = [PROMPTS[1], PROMPTS[1][::-1]]
    expected = [greedy_reference(model, p, 12) for p in same]
    assert generate(model, same, max_new_tokens=12, temperature=0) == expected


def test_tiny_top_p_is_greedy(model):
    greedy = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    gen = torch.Generator().manual_seed(3)
    nucleus = generate(model, PROMPTS, max_new_tokens=10, top_p=1e-6, generator=gen)
    assert nucleus == greedy


def test_sampling_is_reproducible_with_a_seed(model):
    def sample(seed: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return generate(model, PROMPTS, max_new_tokens=16, temperature=1.0, generator=gen)

    first = sample(0)
    assert sample(0) == first
    assert sample(1) != first
    assert first != generate(model, PROMPTS, max_new_tokens=16, temperature=0)
    assert all(len(row) == 16 for row in first)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, temperature=1.0, top_p=0.75, generator=gen)
    assert set(drawn.tolist()) == {1, 3}
    share = (drawn == 1).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.03  # renormalised over the nucleus
    drawn = sample_next(logits, temperature=1.0, top_p=0.9, generator=gen)
    assert set(drawn.tolist()) == {1, 2, 3}
    drawn = sample_next(logits, temperature=1.0, top_p=1.0, generator=gen)
    assert set(drawn.tolist()) == {0, 1, 2, 3}


def test_top_k_keeps_the_k_most_likely():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, temperature=1.0, top_p=1.0, top_k=2, generator=gen)
    assert set(drawn.tolist()) == {1, 3}
    share = (drawn == 1).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.03  # renormalised over the k tokens
    # top-p then cuts the renormalised k tokens: 3 has 0.5 / 0.8 = 0.625 before it.
    drawn = sample_next(logits, temperature=1.0, top_p=0.6, top_k=2, generator=gen)
    assert set(drawn.tolist()) == {1}
    drawn = sample_next(logits, temperature=1.0, top_p=0.7, top_k=2, generator=gen)
    assert set(drawn.tolist()) == {1, 3}
    # 0 and k >= vocabulary: no cut.
    for k in (0, 4, 100):
        drawn = sample_next(logits, temperature=1.0, top_p=1.0, top_k=k, generator=gen)
        assert set(drawn.tolist()) == {0, 1, 2, 3}
    # Exactly k stay when the k-th ties with the next.
    tied = torch.tensor([[0.0, 3.0, 1.0, 1.0]]).expand(2000, -1)
    drawn = sample_next(tied, temperature=1.0, top_p=1.0, top_k=2, generator=gen)
    assert len(set(drawn.tolist())) == 2 and 1 in drawn.tolist()


def test_top_k_1_is_greedy_and_larger_k_samples(model):
    greedy = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    gen = torch.Generator().manual_seed(3)
    assert generate(model, PROMPTS, max_new_tokens=10, top_k=1, generator=gen) == greedy
    gen = torch.Generator().manual_seed(3)
    sampled = generate(model, PROMPTS, max_new_tokens=10, top_k=5, generator=gen)
    assert sampled != greedy
    gen = torch.Generator().manual_seed(3)
    assert generate(model, PROMPTS, max_new_tokens=10, top_k=5, generator=gen) == sampled


def test_stream_yields_generate_tokens(model):
    reference = greedy_reference(model, PROMPTS[1], 12)
    eos_id = reference[4]
    (expected,) = generate(model, [PROMPTS[1]], max_new_tokens=12, temperature=0, eos_id=eos_id)
    steps = stream(model, PROMPTS[1], max_new_tokens=12, temperature=0, eos_id=eos_id)
    assert next(steps) == expected[0]  # one token at a time, before the rest is computed
    assert [expected[0], *steps] == expected
    assert expected[-1] == eos_id
    assert list(stream(model, PROMPTS[0], max_new_tokens=0)) == []
    with pytest.raises(ValueError, match="top_k"):
        list(stream(model, PROMPTS[0], max_new_tokens=3, top_k=-1))


def test_eos_stops_a_sequence(model):
    reference = [greedy_reference(model, p, 12) for p in PROMPTS]
    eos_id = reference[1][4]
    expected = [greedy_reference(model, p, 12, eos_id=eos_id) for p in PROMPTS]
    assert expected[1] == reference[1][: reference[1].index(eos_id) + 1]
    out = generate(model, PROMPTS, max_new_tokens=12, temperature=0, eos_id=eos_id)
    assert out == expected
    assert out[1][-1] == eos_id and len(out[1]) <= 5


def test_generate_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(model, [[1] * 60], max_new_tokens=5)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=5, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], max_new_tokens=5, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k=-1 must be >= 0; 0 disables"):
        generate(model, [[1]], max_new_tokens=5, top_k=-1)
    with pytest.raises(ValueError, match="top_k=2.5 must be an int"):
        generate(model, [[1]], max_new_tokens=5, top_k=2.5)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []], max_new_tokens=5)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [[1, 97]], max_new_tokens=5)
    assert generate(model, PROMPTS, max_new_tokens=0) == [[] for _ in PROMPTS]


# Loading --------------------------------------------------------------------------------------
def test_load_for_generation_from_checkpoint_and_hf_folder(tmp_path):
    cfg = tiny_cfg(n_kv_heads=2)
    model = build(cfg, seed=7)
    (tmp_path / "run").mkdir()
    save_model_checkpoint(tmp_path / "run" / "step-10", model.state_dict(), cfg)
    save_hf_folder(model.state_dict(), cfg, tmp_path / "hf")
    loaded = {}
    for name, path in (("ours", tmp_path / "run"), ("hf", tmp_path / "hf")):
        loaded_model, loaded_cfg = load_for_generation(path, device="cpu", dtype=torch.float32)
        assert loaded_cfg.n_kv_heads == 2 and not loaded_model.training
        assert loaded_model.rope_cos.dtype == torch.float32
        gen = torch.Generator().manual_seed(0)
        loaded[name] = (
            generate(loaded_model, PROMPTS, max_new_tokens=8, temperature=0),
            generate(loaded_model, PROMPTS, max_new_tokens=8, top_p=0.9, generator=gen),
        )
    gen = torch.Generator().manual_seed(0)
    original = (
        generate(model, PROMPTS, max_new_tokens=8, temperature=0),
        generate(model, PROMPTS, max_new_tokens=8, top_p=0.9, generator=gen),
    )
    assert loaded["ours"] == loaded["hf"] == original


# Command line ---------------------------------------------------------------------------------
WORDS = "the cat sat on a mat and dog ran to big red sun in sky we see it now".split()


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory) -> tuple[Path, Path]:
    """A tokenizer of 300 pieces and a checkpoint of a model with that vocabulary."""
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(300)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    tokenizer = train_tokenizer([corpus], root / "tokenizer.model", vocab_size=300, num_threads=1)
    cfg = tiny_cfg(vocab_size=300)
    save_model_checkpoint(root / "ckpt", build(cfg, seed=1).state_dict(), cfg)
    return tokenizer, root / "ckpt"


def test_cli(cli_files):
    tokenizer, checkpoint = cli_files
    result = subprocess.run(
        [
            sys.executable,
            "launch/generate.py",
            "--checkpoint",
            str(checkpoint),
            "--tokenizer",
            str(tokenizer),
            "--prompt",
            "the cat",
            "--prompt",
            "a big red dog ran",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    tok = Tokenizer(tokenizer)
    model, _ = load_for_generation(checkpoint)
    prompts = ["the cat", "a big red dog ran"]
    outputs = generate(
        model, [tok.encode(p) for p in prompts], max_new_tokens=6, temperature=0, eos_id=2
    )
    expected = "".join(f"{p}\n> {tok.decode(o)}\n\n" for p, o in zip(prompts, outputs, strict=True))
    assert result.stdout == expected


def test_cli_chat_wraps_the_prompt(cli_files, capsys):
    tokenizer, checkpoint = cli_files
    args = ["--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer), "--device", "cpu"]
    assert main([*args, "--prompt", "hello", "--chat", "--max-new-tokens", "4", "--seed", "5"]) == 0
    tok = Tokenizer(tokenizer)
    model, _ = load_for_generation(checkpoint)
    ids = encode_dialog(tok, [{"role": "user", "content": "hello"}]).ids
    assert tok.decode(ids).startswith("[INST] hello [/INST]")
    gen = torch.Generator().manual_seed(5)
    (out,) = generate(
        model, [ids], max_new_tokens=4, temperature=0.8, top_p=0.9, eos_id=2, generator=gen
    )
    assert capsys.readouterr().out == f"hello\n> {tok.decode(out)}\n\n"


def test_cli_value_error_is_one_line_and_exit_2(cli_files, tmp_path, capsys):
    tokenizer, checkpoint = cli_files
    args = ["--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer), "--device", "cpu"]
    assert main([*args, "--prompt", "the cat", "--max-new-tokens", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("generate.py: error: ") and "max_seq_len=64" in err
    assert err.count("\n") == 1
    missing = ["--checkpoint", str(tmp_path / "none"), "--tokenizer", str(tokenizer)]
    assert main([*missing, "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
