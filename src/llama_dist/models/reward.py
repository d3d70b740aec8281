"""Reward models: a Llama backbone with a scalar head (../shared/docs/llama2.md, "Reward models").

A reward model is `Llama(cfg)` with `cfg.output_dim = 1`: the output projection gives one score
per position and the reward of a sequence is the score at its last real token (right padding).
It starts from a chat (SFT) checkpoint: `backbone_state_dict` keeps every tensor of the language
model but its next-token head, which the reward model replaces by a freshly initialised one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llama_dist.models.config import LlamaConfig
from llama_dist.models.hf_adapter import _raise_on_mismatch, param_shapes

HEAD_KEY = "output.weight"


def reward_config(cfg: LlamaConfig) -> LlamaConfig:
    """The config of a reward model on the backbone of `cfg`: the same shape, a scalar head."""
    return cfg.replace(output_dim=1)


def backbone_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    reward_cfg: LlamaConfig,
    *,
    source: str = "the language model's state dict",
) -> dict[str, torch.Tensor]:
    """The tensors of `state_dict` a reward model of `reward_cfg` takes: all but the head.

    `state_dict` is a full model state dict in our names (from `load_model_checkpoint` or
    `load_hf_folder`), usually a language model's; its `output.weight`, of whatever width, is
    left out, so the reward model's head keeps its own initialisation. The result has exactly
    the reward model's other tensors (load it with `strict=False`; the only missing key is
    `output.weight`). ValueError, naming `source`, when tensors are missing, unexpected or of
    another shape, i.e. when the backbones differ.
    """
    expected = {k: s for k, s in param_shapes(reward_cfg).items() if k != HEAD_KEY}
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected and k != HEAD_KEY]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(s)}"
        for k, s in expected.items()
        if k in state_dict and state_dict[k].shape != s
    ]
    _raise_on_mismatch(
        source,
        f"the reward model's backbone ({reward_cfg.n_layers} layers, dim {reward_cfg.dim}, "
        f"vocab_size {reward_cfg.vocab_size})",
        "Build the reward model's config from the checkpoint's own, e.g. "
        "reward_config(checkpoint_config), so that only the head differs",
        missing=missing,
        extra=extra,
        wrong=wrong,
    )
    return {k: state_dict[k] for k in expected}


def sequence_rewards(
    scores: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    last_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sequence's reward (bsz,): its score at its last real token.

    scores: the reward model's output, (bsz, seqlen, 1) or (bsz, seqlen); sequences are
    right-padded. Give either `lengths` (bsz,), the number of real tokens of each sequence, or
    `last_index` (bsz,) = lengths - 1, as `collate_preferences` returns it.

    Under tensor parallelism the scalar head already returns a plain tensor, whole on every
    rank; a DTensor (from a custom plan) is gathered with `full_tensor()` first. Under data
    parallelism each rank reads the rewards of its own rows.
    """
    if (lengths is None) == (last_index is None):
        raise ValueError("sequence_rewards needs exactly one of lengths= or last_index=")
    # Duck-typed so that this module stays free of torch.distributed.
    if hasattr(scores, "full_tensor"):
        scores = scores.full_tensor()
    if scores.dim() == 3:
        if scores.shape[-1] != 1:
            raise ValueError(
                f"scores of shape {tuple(scores.shape)} have {scores.shape[-1]} outputs per "
                "position; a reward model has one (model.output_dim=1)"
            )
        scores = scores.squeeze(-1)
    if scores.dim() != 2:
        raise ValueError(
            f"scores must be (bsz, seqlen, 1) or (bsz, seqlen), got {tuple(scores.shape)}"
        )
    bsz, seqlen = scores.shape
    index = last_index if lengths is None else lengths - 1
    name = "last_index" if lengths is None else "lengths"
    if index.shape != (bsz,):
        raise ValueError(f"{name} has shape {tuple(index.shape)}; expected ({bsz},), one per row")
    # An index outside the row would gather padding, or fail on GPU without saying why.
    if bool(((index < 0) | (index >= seqlen)).any()):
        raise ValueError(
            f"{name} must select a real token in each row of {seqlen} positions "
            f"(lengths 1..{seqlen}); got {index.tolist() if lengths is None else lengths.tolist()}"
        )
    return scores.gather(1, index.to(scores.device, torch.long)[:, None]).squeeze(1)
