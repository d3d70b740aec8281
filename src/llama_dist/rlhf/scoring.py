"""Scorers: the reward of responses to prompts, as the RLHF stages rank and train on them.

A scorer's `score(prompts, responses)` returns rewards in (0, 1), one per response, for this
rank's items; scorers backed by a sharded reward model are collective (every rank calls, with
its own number of items, possibly none).

- `RewardModelScorer`: a reward model sharded by the parallel layer; reward = sigmoid(score)
  at the last token of the rendered dialog, the response as its final assistant turn.
- `SafetyGatedScorer`: the Helpfulness and the Safety RM combined by the paper's rule
  (`rewards.safety_gated`).
- `WordShareScorer`: the share of a response's words that are in a target set, a reward a
  program computes, for checks on tasks whose best answer is known.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from llama_dist.data.chat import encode_dialog
from llama_dist.data.prompts import Prompt
from llama_dist.models.hf_adapter import PAD_ID
from llama_dist.models.reward import sequence_rewards
from llama_dist.rlhf.rewards import SAFETY_THRESHOLD, safety_gated
from llama_dist.tokenizer import Tokenizer


class Scorer(Protocol):
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """Rewards in (0, 1), float32 on the CPU, one per (prompt, response)."""
        ...


def _check(prompts: Sequence[Prompt], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


class WordShareScorer:
    """Reward = the share of a response's whitespace-separated words found in `words` (0 for
    an empty response)."""

    def __init__(self, words: Sequence[str]) -> None:
        if not words:
            raise ValueError("WordShareScorer needs at least one target word")
        self.words = frozenset(words)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        _check(prompts, responses)
        shares = []
        for text in responses:
            words = text.split()
            shares.append(sum(w in self.words for w in words) / len(words) if words else 0.0)
        return torch.tensor(shares, dtype=torch.float32)


class RewardModelScorer:
    """A reward model (sharded or not) scoring rendered dialogs in micro-batches.

    Collective when the model is sharded: every rank runs the same number of forwards (the
    most any rank needs; ranks with fewer items run filler rows), so ranks may bring
    different numbers of items. Sequences over `max_len` tokens keep bos and their end.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        device: torch.device,
        micro_batch: int,
        max_len: int,
        pad_to_multiple_of: int = 1,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.micro_batch = micro_batch
        self.max_len = max_len
        self.pad_to_multiple_of = pad_to_multiple_of

    def tokens(self, prompt: Prompt, response: str) -> list[int]:
        ids = encode_dialog(
            self.tokenizer, [*prompt.dialog, {"role": "assistant", "content": response}]
        ).ids
        return ids if len(ids) <= self.max_len else ids[:1] + ids[len(ids) - self.max_len + 1 :]

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """The reward model's scores (before the sigmoid), float32 on the CPU."""
        _check(prompts, responses)
        rows = [self.tokens(p, r) for p, r in zip(prompts, responses, strict=True)]
        batches = math.ceil(len(rows) / self.micro_batch)
        if dist.is_initialized() and dist.get_world_size() > 1:
            most = torch.tensor(batches, device=self.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            batches = int(most.item())
        out = []
        for b in range(batches):
            chunk = rows[b * self.micro_batch : (b + 1) * self.micro_batch]
            real = len(chunk)
            chunk = chunk or [[self.tokenizer.bos_id]]  # filler: joins the collective forward
            lengths = torch.tensor([len(r) for r in chunk])
            width = -(-int(lengths.max()) // self.pad_to_multiple_of) * self.pad_to_multiple_of
            tokens = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
            for i, row in enumerate(chunk):
                tokens[i, : len(row)] = torch.tensor(row)
            scores = self.model(tokens.to(self.device))
            rewards = sequence_rewards(scores, last_index=(lengths - 1).to(self.device))
            out.append(rewards.float().cpu()[:real])
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return torch.sigmoid(self.raw_scores(prompts, responses))


class SafetyGatedScorer:
    """Rc: the Safety RM's reward on safety-tagged prompts and where it is below `threshold`,
    the Helpfulness RM's elsewhere (llama2.md, "PPO")."""

    def __init__(
        self,
        helpful: RewardModelScorer,
        safety: RewardModelScorer,
        *,
        threshold: float = SAFETY_THRESHOLD,
    ) -> None:
        self.helpful = helpful
        self.safety = safety
        self.threshold = threshold

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        tagged = torch.tensor([p.safety_tagged for p in prompts], dtype=torch.bool)
        return safety_gated(
            self.helpful.score(prompts, responses),
            self.safety.score(prompts, responses),
            tagged,
            threshold=self.threshold,
        )
