"""PPO arithmetic (llama2.md, "PPO"): the reward of a response, per-token KL penalty, GAE
advantages and the clipped losses. Pure functions on tensors; the distributed pieces (global
whitening statistics) take their sums from the caller.

Shapes: per-response tensors are (n,); per-token tensors are (n, T) over the response tokens,
with `mask` (n, T) True on real tokens (responses end at eos or at the length limit and are
right-padded).
"""

from __future__ import annotations

import torch

# Rc in (0, 1) is clamped this far from 0 and 1 before LOGIT, which is infinite there.
LOGIT_EPS = 1e-6


def logit(p: torch.Tensor, *, eps: float = LOGIT_EPS) -> torch.Tensor:
    """log(p / (1 - p)): undoes the sigmoid a reward model's probability went through."""
    p = p.double().clamp(eps, 1.0 - eps)
    return (torch.log(p) - torch.log1p(-p)).to(torch.float32)


def whiten(
    x: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    stats: tuple[float, float, float] | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(x - mean) / std over the entries of `x` (those under `mask`), the population std.

    stats: (count, sum, sum of squares) over every rank's entries, for whitening a batch split
    over data-parallel ranks exactly as one process would; by default this tensor's own.
    shift_mean=False keeps the mean (scales only), as is usual for advantages' returns.
    """
    values = x if mask is None else x[mask]
    if stats is None:
        stats = (
            values.numel(),
            float(values.double().sum()),
            float(values.double().square().sum()),
        )
    count, total, squares = stats
    if count < 2:
        raise ValueError(f"whitening needs at least 2 entries, got {count}")
    mean = total / count
    var = max(squares / count - mean * mean, 0.0)
    out = (x - mean) / (var + eps) ** 0.5
    if not shift_mean:
        out = out + mean
    return out if mask is None else torch.where(mask, out, torch.zeros_like(out))


def moment_stats(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(count, sum, sum of squares) of the entries, float64: all-reduce it (sum) for `whiten`."""
    values = (x if mask is None else x[mask]).double()
    return torch.stack(
        [
            torch.tensor(float(values.numel()), dtype=torch.float64),
            values.sum(),
            values.square().sum(),
        ]
    )


def token_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards R(g | p) = R~c(g | p) - beta * KL, and the per-token KL.

    score: (n,) R~c, the whitened logit of the chosen reward, placed on each response's last
    real token (the last True of its mask row, which may begin after a prompt). The KL per
    token is the sampled-token estimate log pi(g_t) - log pi_0(g_t), so the penalty summed
    over a response is beta times its KL to the reference.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    if not bool(mask.any(1).all()):
        raise ValueError("every response needs at least one token")
    # The last True position of each row (responses may start after a prompt).
    last = mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(1)
    rewards = rewards.clone()
    rewards[torch.arange(len(score)), last] += score.to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after a response's last token;
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V. Zero on padding.
    """
    mask_f = mask.to(rewards.dtype)
    values = values * mask_f
    n, steps = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask_f[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask_f


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate summed over real tokens, and the fraction of tokens clipped:
    -min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A) with ratio = exp(logp - logp_old)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (unclipped > clipped) & mask
    return (loss * mask).sum(), was_clipped.sum() / mask.sum().clamp(min=1)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
) -> torch.Tensor:
    """0.5 * (V - returns)^2 summed over real tokens; with `clip`, the larger of that and the
    loss of V kept within `clip` of the rollout's values (the usual PPO value clipping)."""
    loss = (values - returns).square()
    if clip is not None:
        kept = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (kept - returns).square())
    return 0.5 * (loss * mask).sum()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - V) / Var(returns) over real tokens (1: perfect, 0: no better than the
    mean)."""
    v, r = values[mask].double(), returns[mask].double()
    var = r.var(unbiased=False)
    return float(1.0 - (r - v).var(unbiased=False) / var) if var > 0 else float("nan")


def kl_coefficient(num_params: int) -> float:
    """beta of llama2.md: 0.01 for 7B and 13B, 0.005 for 34B and 70B (and larger)."""
    return 0.005 if num_params >= 30e9 else 0.01
