"""PPO arithmetic against hand-computed values: logit, whitening (also split over ranks), the
per-token KL reward, GAE, the clipped policy and value losses."""

from __future__ import annotations

import math

import pytest
import torch

from llama_dist.models.config import get_preset
from llama_dist.rlhf.ppo import (
    explained_variance,
    gae,
    kl_coefficient,
    logit,
    moment_stats,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)


def test_logit_undoes_the_sigmoid_and_stays_finite():
    x = torch.tensor([-3.0, 0.0, 2.5])
    torch.testing.assert_close(logit(torch.sigmoid(x)), x, rtol=0, atol=1e-5)
    edges = logit(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(edges).all() and edges[0] == -edges[1]
    assert edges[1].item() == pytest.approx(math.log((1 - 1e-6) / 1e-6), rel=1e-5)


def test_whiten_by_hand_and_across_ranks():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (x - 2.5) / math.sqrt(1.25)
    torch.testing.assert_close(whiten(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(whiten(x, shift_mean=False), expected + 2.5, rtol=0, atol=1e-6)
    # Two ranks with two entries each: summed statistics whiten like one process.
    stats = moment_stats(x[:2]) + moment_stats(x[2:])
    halves = [whiten(part, stats=tuple(stats.tolist())) for part in (x[:2], x[2:])]
    torch.testing.assert_close(torch.cat(halves), expected, rtol=0, atol=1e-6)
    masked = whiten(
        torch.tensor([[1.0, 3.0], [9.0, 0.0]]), mask=torch.tensor([[1, 1], [0, 0]]).bool()
    )
    torch.testing.assert_close(masked, torch.tensor([[-1.0, 1.0], [0.0, 0.0]]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        whiten(torch.tensor([1.0]))


def test_token_rewards_by_hand():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -7.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -3.0]])
    rewards, kl = token_rewards(torch.tensor([1.0, -2.0]), logprobs, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    expected = torch.tensor([[-0.05, 0.1, 1.0], [-0.1, -2.0, 0.0]])
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-6)
    # A response that begins after its prompt: the score lands on its last token.
    late = torch.tensor([[0, 1, 1, 0]]).bool()
    rewards, _ = token_rewards(
        torch.tensor([3.0]), torch.zeros(1, 4), torch.zeros(1, 4), late, beta=0.1
    )
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, 3.0, 0.0]]))


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 0: deltas 0.1, 0.1, 0.3 -> A = 0.225, 0.25, 0.3. Row 1 ends at t=1 (V after is 0):
    # deltas 0.1, 0.4 -> A = 0.3, 0.4; padding 0.
    torch.testing.assert_close(
        advantages, torch.tensor([[0.225, 0.25, 0.3], [0.3, 0.4, 0.0]]), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        returns, torch.tensor([[0.725, 0.85, 1.0], [0.8, 1.0, 0.0]]), rtol=0, atol=1e-6
    )
    discounted, _ = gae(rewards[:1], torch.zeros(1, 3), mask[:1], gamma=0.9, lam=1.0)
    torch.testing.assert_close(discounted, torch.tensor([[0.81, 0.9, 1.0]]), rtol=0, atol=1e-6)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0, 0.5]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, clip_fraction = policy_loss(new, old, advantages, mask, clip=0.2)
    # -min(1.5, 1.2) - min(0.5, 0.8) - min(-1, -1) - min(-0.5, -0.8)
    assert loss.item() == pytest.approx(-1.2 - 0.5 + 1.0 + 0.8)
    assert clip_fraction.item() == pytest.approx(0.5)  # tokens 0 and 3
    # The gradient is zero where the clipped term binds.
    new = new.clone().requires_grad_(True)
    policy_loss(new, old, advantages, mask)[0].backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 3] == 0 and new.grad[0, 1] != 0


def test_value_loss_and_explained_variance():
    mask = torch.ones(1, 1, dtype=torch.bool)
    one = torch.tensor([[1.0]])
    loss = value_loss(one, torch.zeros(1, 1), torch.tensor([[2.0]]), mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.2 - 2.0) ** 2)  # the clipped one is larger
    assert value_loss(one, torch.zeros(1, 1), torch.tensor([[2.0]]), mask, clip=None).item() == 0.5
    r = torch.tensor([[1.0, 2.0, 3.0]])
    full = torch.ones(1, 3, dtype=torch.bool)
    assert explained_variance(r, r, full) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(r, 2.0), r, full) == pytest.approx(0.0)


def test_kl_coefficient_follows_the_paper():
    assert kl_coefficient(get_preset("7b").num_params()) == 0.01
    assert kl_coefficient(get_preset("13b").num_params()) == 0.01
    assert kl_coefficient(get_preset("34b").num_params()) == 0.005
    assert kl_coefficient(get_preset("70b").num_params()) == 0.005
