"""Reward models: the scalar head on the Llama backbone, reading rewards, loading a backbone,
HF `LlamaForSequenceClassification` export/import, and FSDP / TP layouts against one process.

HF parity runs both models in fp32 on a tiny random reward model and right-padded batches of
different lengths (tolerance 1e-5). The 2-rank gloo test compares rewards, the ranking loss and
first-step gradients of FSDP 2, TP 2 + SP and TP 2 against a single process (1e-6).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from llama_dist.checkpoint.convert import main as convert_main
from llama_dist.checkpoint.manager import check_checkpoint, model_shape
from llama_dist.checkpoint.model_io import load_model_checkpoint, save_model_checkpoint
from llama_dist.models import Llama, LlamaConfig
from llama_dist.models.flops import flops_per_token
from llama_dist.models.hf_adapter import (
    PAD_ID,
    config_from_hf,
    config_to_hf,
    load_hf_folder,
    save_hf_folder,
)
from llama_dist.models.reward import backbone_state_dict, reward_config, sequence_rewards
from llama_dist.parallel import ParallelConfig
from llama_dist.rlhf.ranking import margin_table, rating_margins, reward_model_loss
from llama_dist.testing.distributed import run_distributed

LM = LlamaConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden_dim=200, max_seq_len=64
)
RM = reward_config(LM)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def random_reward_model(cfg: LlamaConfig = RM, seed: int = 0) -> Llama:
    model = Llama(cfg)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Norms off ones and sharper attention, so that a swapped name or a wrong rotary
            # layout changes the scores; a head of unit scale makes the rewards differ visibly.
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
            if name.endswith(("wq.weight", "wk.weight")):
                param.mul_(10.0)
            if name == "output.weight":
                param.copy_(torch.randn(param.shape, generator=gen) / cfg.dim**0.5)
    return model.eval()


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (with PAD_ID) random tokens that never contain PAD_ID themselves."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(lengths), max(lengths)), PAD_ID)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(3, LM.vocab_size, (n,), generator=gen)
    return tokens, torch.tensor(lengths)


# The head ---------------------------------------------------------------------------------------
def test_scalar_head_shape_params_and_init():
    model = Llama(RM)
    assert model.output.weight.shape == (1, RM.dim)
    assert sum(p.numel() for p in model.parameters()) == RM.num_params()
    assert LM.num_params() - RM.num_params() == (LM.vocab_size - 1) * LM.dim
    # The embedding is excluded either way; only the head's width changes.
    assert (
        RM.num_params(exclude_embedding=True)
        == LM.num_params(exclude_embedding=True) - (LM.vocab_size - 1) * LM.dim
    )
    stds = model.param_init_std()
    assert stds["output.weight"] == 0.02
    assert Llama(LM).param_init_std()["output.weight"] == LM.dim**-0.5
    tokens, _ = padded_batch([5, 7])
    model.init_weights(0)
    assert model(tokens).shape == (2, 7, 1)


def test_flops_count_the_head_at_its_width():
    seq = 32
    assert flops_per_token(LM, seq) - flops_per_token(RM, seq) == 6 * (LM.vocab_size - 1) * LM.dim


@pytest.mark.parametrize("bad", [0, -1, 1.0, "1"])
def test_output_dim_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="model.output_dim"):
        LM.replace(output_dim=bad)


def test_config_round_trips_output_dim():
    assert LlamaConfig.from_dict(RM.to_dict()) == RM
    assert LlamaConfig.from_dict(LM.to_dict()).output_dim is None


def test_tp_validation_checks_the_head_only_for_language_models():
    ParallelConfig(tp=2).validate(2, RM)  # one score row: replicated, no divisibility needed
    odd_vocab = LM.replace(vocab_size=255)
    with pytest.raises(ValueError, match="model.vocab_size=255"):
        ParallelConfig(tp=2).validate(2, odd_vocab)
    # The embedding is still sharded on the vocabulary, whatever the head.
    with pytest.raises(ValueError, match="model.vocab_size=255"):
        ParallelConfig(tp=2).validate(2, reward_config(odd_vocab))


# Reading rewards --------------------------------------------------------------------------------
def test_sequence_rewards_reads_the_last_real_token():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
    expected = torch.tensor([2.0, 8.0, 9.0])
    lengths = torch.tensor([2, 4, 1])
    assert torch.equal(sequence_rewards(scores, lengths=lengths), expected)
    assert torch.equal(sequence_rewards(scores[..., None], last_index=lengths - 1), expected)


def test_sequence_rewards_gradient_reaches_only_the_read_positions():
    scores = torch.zeros(2, 3, 1, requires_grad=True)
    sequence_rewards(scores, lengths=torch.tensor([3, 1])).sum().backward()
    assert scores.grad[..., 0].tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]


def test_sequence_rewards_errors():
    scores = torch.zeros(2, 4, 1)
    with pytest.raises(ValueError, match="exactly one of"):
        sequence_rewards(scores)
    with pytest.raises(ValueError, match="exactly one of"):
        sequence_rewards(scores, lengths=torch.tensor([1, 1]), last_index=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="lengths 1..4"):
        sequence_rewards(scores, lengths=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="lengths 1..4"):
        sequence_rewards(scores, lengths=torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="expected \\(2,\\)"):
        sequence_rewards(scores, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="model.output_dim=1"):
        sequence_rewards(torch.zeros(2, 4, 3), lengths=torch.tensor([1, 2]))


def test_padding_after_the_last_token_does_not_change_the_reward():
    model = random_reward_model()
    tokens, lengths = padded_batch([6, 11])
    rewards = sequence_rewards(model(tokens), lengths=lengths)
    alone = sequence_rewards(model(tokens[:1, :6]), lengths=torch.tensor([6]))
    torch.testing.assert_close(rewards[:1], alone, rtol=0, atol=1e-6)


# Loading a backbone -----------------------------------------------------------------------------
def test_backbone_state_dict_keeps_everything_but_the_head():
    lm = Llama(LM)
    lm.init_weights(3)
    sd = backbone_state_dict(lm.state_dict(), RM)
    assert "output.weight" not in sd
    assert sd.keys() == lm.state_dict().keys() - {"output.weight"}
    rm = Llama(RM)
    rm.init_weights(0)
    head = rm.output.weight.detach().clone()
    result = rm.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["output.weight"] and not result.unexpected_keys
    assert torch.equal(rm.output.weight, head)  # the fresh head survives
    for name, tensor in sd.items():
        assert torch.equal(rm.state_dict()[name], tensor), name


def test_backbone_state_dict_rejects_another_backbone():
    other_depth = Llama(LM.replace(n_layers=3)).state_dict()
    with pytest.raises(ValueError, match="unexpected 9 tensors .*layers.2"):
        backbone_state_dict(other_depth, RM)
    with torch.device("meta"):
        other_width = Llama(LM.replace(ffn_hidden_dim=128)).state_dict()
    with pytest.raises(ValueError, match="wrong shape.*feed_forward.w1.weight .*reward_config"):
        backbone_state_dict(other_width, RM, source="ckpt/step-10")
    partial = dict(Llama(LM).state_dict())
    del partial["norm.weight"]
    with pytest.raises(ValueError, match="missing 1 tensors \\(norm.weight\\)"):
        backbone_state_dict(partial, RM)


def test_lm_checkpoint_is_refused_for_a_reward_model_with_a_hint(tmp_path):
    lm = Llama(LM)
    lm.init_weights(0)
    path = save_model_checkpoint(tmp_path / "lm", lm.state_dict(), LM)
    assert model_shape(LM)["output_dim"] == LM.vocab_size
    assert model_shape(RM)["output_dim"] == 1
    check_checkpoint(path, LM)
    with pytest.raises(ValueError, match="output_dim=256 \\(this model: 1\\).*backbone_state_dict"):
        check_checkpoint(path, RM)
    # The supported path: load the LM and take its backbone.
    cfg, sd = load_model_checkpoint(path)
    assert backbone_state_dict(sd, reward_config(cfg)).keys() == sd.keys() - {"output.weight"}


# HF LlamaForSequenceClassification ------------------------------------------------------------
def test_config_to_hf_describes_a_sequence_classifier():
    hf = config_to_hf(RM)
    assert hf["architectures"] == ["LlamaForSequenceClassification"]
    assert hf["num_labels"] == 1 and hf["id2label"] == {"0": "LABEL_0"}
    assert hf["problem_type"] == "regression"
    assert hf["pad_token_id"] == PAD_ID
    assert config_from_hf(hf) == RM
    lm = config_to_hf(LM)
    assert lm["architectures"] == ["LlamaForCausalLM"] and "num_labels" not in lm
    assert config_from_hf(lm) == LM


def test_config_from_hf_reads_the_number_of_labels():
    hf = config_to_hf(RM)
    del hf["num_labels"]
    hf["id2label"] = {"0": "a", "1": "b"}
    assert config_from_hf(hf).output_dim == 2
    hf = config_to_hf(RM)
    hf["num_labels"] = 3
    with pytest.raises(ValueError, match="num_labels=3 disagrees with its id2label"):
        config_from_hf(hf)
    hf = {k: v for k, v in config_to_hf(RM).items() if k not in ("num_labels", "id2label")}
    assert config_from_hf(hf).output_dim == 2  # transformers' default


def test_exported_reward_model_scores_like_transformers(tmp_path, offline):
    transformers = pytest.importorskip("transformers")
    model = random_reward_model()
    tokens, lengths = padded_batch([5, 12, 9, 1], seed=1)
    with torch.no_grad():
        ours = sequence_rewards(model(tokens), lengths=lengths)
    folder = save_hf_folder(model.state_dict(), RM, tmp_path / "hf")
    assert not (folder / "generation_config.json").exists()
    written = json.loads((folder / "config.json").read_text())
    assert written["architectures"] == ["LlamaForSequenceClassification"]
    hf = transformers.LlamaForSequenceClassification.from_pretrained(
        folder, local_files_only=True
    ).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == PAD_ID
    with torch.no_grad():
        # transformers finds each row's last token as the rightmost non-padding one.
        theirs = hf(input_ids=tokens).logits.squeeze(-1)
        masked = hf(input_ids=tokens, attention_mask=(tokens != PAD_ID).long()).logits
    assert ours.std() > 0.1  # rewards that differ, so a wrong position would show
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(masked.squeeze(-1), ours, rtol=0, atol=1e-5)


def test_transformers_reward_model_imports(tmp_path, offline):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        hidden_size=LM.dim,
        intermediate_size=LM.hidden_dim,
        num_hidden_layers=LM.n_layers,
        num_attention_heads=LM.n_heads,
        num_key_value_heads=LM.num_kv_heads,
        vocab_size=LM.vocab_size,
        rms_norm_eps=LM.norm_eps,
        max_position_embeddings=LM.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
        num_labels=1,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(hf_cfg).float().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif "embed" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    hf.save_pretrained(tmp_path / "hf")
    cfg, sd = load_hf_folder(tmp_path / "hf")
    assert cfg.output_dim == 1 and cfg.rope_theta == 20000.0
    model = Llama(cfg)
    model.load_state_dict(sd)
    model.eval()
    tokens, lengths = padded_batch([7, 3, 12], seed=2)
    with torch.no_grad():
        ours = sequence_rewards(model(tokens), lengths=lengths)
        theirs = hf(input_ids=tokens).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_folder_round_trip_and_convert_cli(tmp_path):
    model = random_reward_model()
    sd = model.state_dict()
    ckpt = save_model_checkpoint(tmp_path / "ckpt", sd, RM)
    assert convert_main(["--to-hf", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    cfg, from_hf = load_hf_folder(tmp_path / "hf")
    assert cfg == RM
    assert from_hf.keys() == sd.keys()
    for name, tensor in sd.items():
        assert torch.equal(from_hf[name], tensor), name
    assert convert_main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    cfg, back = load_model_checkpoint(tmp_path / "back")
    assert cfg.output_dim == 1
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_sequence_classifier_folder_with_a_language_model_head_is_refused(tmp_path):
    lm = Llama(LM)
    lm.init_weights(0)
    folder = save_hf_folder(lm.state_dict(), LM, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], num_labels=1)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing 1 tensors \\(score.weight\\).*lm_head.weight"):
        load_hf_folder(folder)


# Layouts ----------------------------------------------------------------------------------------
NUM_PAIRS = 4
PAIR_LENGTHS = [(9, 5), (3, 12), (7, 7), (14, 2)]  # (chosen, rejected) tokens per pair
SAFETY_WEIGHT = 0.5


def pair_data():
    """Tokens of NUM_PAIRS pairs (chosen and rejected of different lengths), rating ids and
    safety labels; every response is labelled, so per-rank means average to the global one."""
    chosen, _ = padded_batch([c for c, _ in PAIR_LENGTHS], seed=3)
    rejected, _ = padded_batch([r for _, r in PAIR_LENGTHS], seed=4)
    return {
        "chosen": chosen,
        "rejected": rejected,
        "chosen_len": torch.tensor([c for c, _ in PAIR_LENGTHS]),
        "rejected_len": torch.tensor([r for _, r in PAIR_LENGTHS]),
        "ratings": torch.tensor([0, 3, 1, 2]),
        "chosen_safe": torch.tensor([1, 1, 0, 1]),
        "rejected_safe": torch.tensor([0, 1, 0, 0]),
    }


def one_batch(data, pairs: slice, multiple_of: int):
    """The rows of `pairs`: chosen first, then rejected, padded to their own longest (rounded up
    to `multiple_of` for sequence parallelism)."""
    lengths = torch.cat([data["chosen_len"][pairs], data["rejected_len"][pairs]])
    seqlen = -(-int(lengths.max()) // multiple_of) * multiple_of
    width = max(data["chosen"].shape[1], data["rejected"].shape[1], seqlen)
    rows = []
    for key in ("chosen", "rejected"):
        t = data[key][pairs]
        rows.append(torch.nn.functional.pad(t, (0, width - t.shape[1]), value=PAD_ID))
    return torch.cat(rows)[:, :seqlen], lengths - 1


def score_and_backward(model, data, pairs: slice, multiple_of: int, loss_ctx):
    tokens, last_index = one_batch(data, pairs, multiple_of)
    n = tokens.shape[0] // 2
    with loss_ctx:
        scores = model(tokens)
        assert not hasattr(scores, "full_tensor"), "the scalar head returns a plain tensor"
        rewards = sequence_rewards(scores, last_index=last_index)
        loss = reward_model_loss(
            rewards[:n],
            rewards[n:],
            margin=rating_margins(data["ratings"][pairs], margin_table("large")),
            chosen_safe=data["chosen_safe"][pairs],
            rejected_safe=data["rejected_safe"][pairs],
            safety_weight=SAFETY_WEIGHT,
        )
        loss.backward()
    return rewards.detach(), loss.detach()


def full_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        grad = param.grad
        out[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()
    return out


def reference_run():
    import contextlib

    from llama_dist.parallel import build_llama

    data = pair_data()
    model = build_llama(RM, ParallelConfig(dp_shard=1), None, device=torch.device("cpu"), seed=7)
    rewards, loss = score_and_backward(
        model, data, slice(None), multiple_of=1, loss_ctx=contextlib.nullcontext()
    )
    n = NUM_PAIRS
    return {"chosen": rewards[:n], "rejected": rewards[n:], "loss": loss}, full_grads(model)


def layouts_worker() -> dict:
    from llama_dist.parallel import build_llama, build_mesh, dp_rank_and_size, loss_context

    data = pair_data()
    results = {}
    layouts = {
        "fsdp2": ParallelConfig(),
        "tp2_sp": ParallelConfig(tp=2),
        "tp2": ParallelConfig(tp=2, sequence_parallel=False, loss_parallel=False),
    }
    for name, cfg in layouts.items():
        cfg.validate(dist.get_world_size(), RM)
        mesh = build_mesh(cfg, device="cpu")
        model = build_llama(RM, cfg, mesh, device=torch.device("cpu"), seed=7)
        dp_rank, dp_size = dp_rank_and_size(mesh)
        per_rank = NUM_PAIRS // dp_size
        pairs = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        multiple_of = cfg.tp if cfg.sequence_parallel else 1
        rewards, loss = score_and_backward(model, data, pairs, multiple_of, loss_context(cfg))
        n = rewards.shape[0] // 2
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (rewards[:n], rewards[n:], loss))
        # Data-parallel ranks hold different pairs (concatenated in rank order); tp ranks the
        # same ones, of which one copy is kept.
        parts = gathered[:: dist.get_world_size() // dp_size]
        results[name] = (
            {
                "chosen": torch.cat([p[0] for p in parts]),
                "rejected": torch.cat([p[1] for p in parts]),
                # FSDP averages gradients over ranks, so the loss is the ranks' mean.
                "loss": torch.stack([p[2] for p in parts]).mean(),
                "tp_copies_equal": all(torch.equal(g[0], gathered[0][0]) for g in gathered)
                if dp_size == 1
                else True,
            },
            full_grads(model),
        )
    return results


@pytest.fixture(scope="module")
def layouts():
    return run_distributed(layouts_worker, 2)


@pytest.mark.parametrize("layout", ["fsdp2", "tp2_sp", "tp2"])
def test_reward_model_layout_matches_single_process(layouts, layout):
    ref_out, ref_grads = reference_run()
    out, grads = layouts[layout]
    assert out["tp_copies_equal"]
    torch.testing.assert_close(out["chosen"], ref_out["chosen"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["rejected"], ref_out["rejected"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["loss"], ref_out["loss"], rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    assert ref_grads["output.weight"].abs().max() > 1e-3  # the head is trained
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6, msg=name)
