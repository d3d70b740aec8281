"""The PPO loop (llama2.md, "PPO"): the policy against the safety-gated reward, on any layout.

Models, all built by the parallel layer: the policy (trained), a frozen reference copy of it,
a value model initialised from a reward model (trained), and the scorer's reward models
(frozen; `rlhf.scoring`). Frozen models have no optimizer.

Each iteration: consolidate the policy and sample one response per prompt of the iteration's
batch (each data-parallel rank its share), score the responses, compute the per-token rewards
R = WHITEN(LOGIT(Rc)) on the last token - beta * KL to the reference, GAE advantages, then one
optimizer step of the policy (clipped objective) and of the value model per minibatch. Every
loss is summed over response tokens and divided by their count over all ranks, through the
shared step (`train.step.forward_backward`), so a step is the same on every layout.
Checkpoints hold the policy as `model` (usable wherever an SFT checkpoint is) and the value
model, both optimizers and the iteration count; the prompts of iteration i are fixed by i.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from llama_dist.checkpoint import CheckpointManager, ModelState, OptimizerState
from llama_dist.checkpoint.init import load_initial_weights, source_config
from llama_dist.config import PPOJobConfig, check_collective_timeout
from llama_dist.data.chat import encode_dialog
from llama_dist.data.epochs import items_at
from llama_dist.data.prompts import Prompt, read_prompts
from llama_dist.generation_dist import consolidated_for_generation, generate_distributed
from llama_dist.losses import IGNORE_INDEX, cross_entropy_loss
from llama_dist.metrics.logger import read_metrics
from llama_dist.models.config import LlamaConfig
from llama_dist.models.hf_adapter import PAD_ID
from llama_dist.parallel import build_llama, build_mesh, dp_rank_and_size, loss_context
from llama_dist.rlhf.ppo import (
    gae,
    kl_coefficient,
    logit,
    moment_stats,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from llama_dist.rlhf.rewards import safety_gated
from llama_dist.rlhf.scoring import SafetyGatedScorer
from llama_dist.train.common import (
    GuardedStep,
    build_optimizer,
    metrics_logger,
    open_run,
    refuse_fresh_start_over_checkpoints,
    resume_latest,
)
from llama_dist.train.pretrain import check_tokenizer
from llama_dist.train.rejection_sampling import build_scorer
from llama_dist.train.step import StopSignal, TrainState, forward_backward, global_count

log = logging.getLogger("llama_dist.train.ppo")


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def validate_ppo(cfg: PPOJobConfig, world_size: int) -> tuple[LlamaConfig, LlamaConfig, str]:
    """Check the job from config files alone; returns (policy config, value config, the
    value model's source)."""
    for name in ("policy", "tokenizer"):
        if not getattr(cfg, name):
            raise ValueError(f"{name} is not set")
    if not cfg.prompts:
        raise ValueError("prompts is empty; set prompts=[FILE.jsonl, ...]")
    policy = source_config(cfg.policy)
    if not policy.is_lm_head:
        raise ValueError(f"policy {cfg.policy} is a reward model; train a language model")
    cfg.scorer.validate()
    cfg.ppo.validate()
    check_collective_timeout(cfg.collective_timeout_s, "collective_timeout_s")
    value_from = cfg.value_from or cfg.scorer.reward_model or cfg.scorer.helpfulness_rm
    if not value_from:
        raise ValueError(
            "value_from is not set and the scorer has no reward model to start the value "
            "model from; set value_from=REWARD_MODEL_CHECKPOINT"
        )
    value = source_config(value_from)
    if value.output_dim != 1:
        raise ValueError(f"value_from={value_from} is not a reward model (scalar head)")
    cfg.parallel.validate(world_size, policy)
    cfg.parallel.validate(world_size, value)
    if cfg.ppo.minibatch_prompts % cfg.parallel.dp:
        raise ValueError(
            f"ppo.minibatch_prompts={cfg.ppo.minibatch_prompts} must be divisible by the "
            f"data-parallel size {cfg.parallel.dp}"
        )
    if cfg.iterations < 1 or cfg.micro_batch < 1 or cfg.patience < 1:
        raise ValueError("iterations, micro_batch and patience must be >= 1")
    if not 0 <= cfg.valid_fraction < 1:
        raise ValueError(f"valid_fraction={cfg.valid_fraction} must be in [0, 1)")
    return policy, value, value_from


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    """log pi(token) of each labelled position (0 elsewhere), (n, L)."""
    tokens = batch["tokens"].to(device)
    labels = batch["labels"].to(device)
    per_token = cross_entropy_loss(model(tokens), labels, reduction="none")
    return -_whole(per_token).view(labels.shape)


def token_values(model: nn.Module, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    return _whole(model(batch["tokens"].to(device))).squeeze(-1).float()


class PolicyObjective:
    """The clipped surrogate summed over response tokens (`train.step.Objective`)."""

    def __init__(self, clip: float) -> None:
        self.clip = clip
        self.clipped = 0.0

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["mask"].sum())

    def loss_sum(self, model, batch, device) -> torch.Tensor:
        mask = batch["mask"].to(device)
        logp = token_logprobs(model, batch, device)
        loss, fraction = policy_loss(
            logp,
            batch["old_logprobs"].to(device),
            batch["advantages"].to(device),
            mask,
            clip=self.clip,
        )
        self.clipped += float(fraction) * int(mask.sum())
        return loss


class ValueObjective:
    """The (clipped) value loss summed over response tokens."""

    def __init__(self, clip: float | None) -> None:
        self.clip = clip

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["mask"].sum())

    def loss_sum(self, model, batch, device) -> torch.Tensor:
        return value_loss(
            token_values(model, batch, device),
            batch["old_values"].to(device),
            batch["returns"].to(device),
            batch["mask"].to(device),
            clip=self.clip,
        )


def rollout_rows(
    prompt_ids: list[list[int]], responses: list[list[int]], *, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """tokens (n, L) = prompt + response right-padded; labels: each response token at the
    position that predicts it, IGNORE_INDEX elsewhere; mask: labels != IGNORE_INDEX."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, responses, strict=True)]
    width = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, responses, strict=True)):
        tokens[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) - 1 : len(p) + len(r) - 1] = torch.tensor(r)
    return {"tokens": tokens, "labels": labels, "mask": labels != IGNORE_INDEX}


def _chunks(batch: dict[str, torch.Tensor], rows: range, size: int) -> list[dict]:
    out = []
    for start in range(rows.start, rows.stop, size):
        stop = min(start + size, rows.stop)
        out.append({k: v[start:stop] for k, v in batch.items()})
    return out


def _global_stats(x: torch.Tensor, mask: torch.Tensor | None, device) -> tuple[float, ...]:
    # Tensor-parallel ranks add identical copies: count, sum and squares scale alike.
    stats = moment_stats(x, mask).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    return tuple(stats.tolist())


def _global_mean(values: list[float], device) -> float:
    t = torch.tensor([sum(values), float(len(values))], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] else float("nan")


def _global_explained_variance(values, returns, mask, device) -> float:
    """`rlhf.ppo.explained_variance` over every rank's response tokens."""

    def var(x: torch.Tensor) -> float:
        count, total, squares = _global_stats(x, mask, device)
        return squares / count - (total / count) ** 2

    spread = var(returns)
    return 1.0 - var(returns - values) / spread if spread > 0 else float("nan")


@dataclass
class EarlyStop:
    """Best held-out reward so far and evaluations since (a `Stateful`)."""

    best: float = -math.inf
    since_best: int = 0

    def update(self, reward: float) -> None:
        if reward > self.best:
            self.best, self.since_best = reward, 0
        else:
            self.since_best += 1

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.since_best = float(state["best"]), int(state["since_best"])


class Rollouts:
    """Sampling and scoring of prompts with the policy consolidated for generation."""

    def __init__(self, cfg: PPOJobConfig, tokenizer, scorer, mesh, device) -> None:
        self.cfg, self.tokenizer, self.scorer = cfg, tokenizer, scorer
        self.mesh, self.device = mesh, device

    def generate(self, policy, prompts: list[Prompt], seed: int) -> list[list[int]]:
        p = self.cfg.ppo
        eos = self.tokenizer.eos_id
        with consolidated_for_generation(policy, self.mesh) as gen_model:
            out = generate_distributed(
                gen_model,
                [encode_dialog(self.tokenizer, q.dialog).ids for q in prompts],
                mesh=self.mesh,
                max_new_tokens=p.max_new_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                eos_id=eos,
                generator=torch.Generator(self.device).manual_seed(seed),
            )
        # Keep eos: the policy learns where to stop.
        return [r[: r.index(eos) + 1] if eos in r else r for r in out]

    def text(self, response: list[int]) -> str:
        eos = self.tokenizer.eos_id
        return self.tokenizer.decode([t for t in response if t != eos]).strip()

    def score(self, prompts: list[Prompt], texts: list[str]) -> dict[str, torch.Tensor]:
        """Rc and, for the safety-gated scorer, each RM's reward."""
        if isinstance(self.scorer, SafetyGatedScorer):
            h = self.scorer.helpful.score(prompts, texts)
            s = self.scorer.safety.score(prompts, texts)
            tagged = torch.tensor([q.safety_tagged for q in prompts], dtype=torch.bool)
            rc = safety_gated(h, s, tagged, threshold=self.scorer.threshold)
            return {"reward": rc, "helpful_reward": h, "safety_reward": s}
        return {"reward": self.scorer.score(prompts, texts)}


def ppo(cfg: PPOJobConfig, run_dir: Path) -> TrainState:
    """Run (or resume) PPO into `run_dir`; every rank calls this."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    policy_cfg, value_cfg, value_from = validate_ppo(cfg, world_size)
    tokenizer = check_tokenizer(cfg.tokenizer, policy_cfg.vocab_size)
    prompts = read_prompts(cfg.prompts, skip_invalid=cfg.skip_invalid)
    perm = np.random.default_rng(cfg.seed).permutation(len(prompts))
    num_valid = round(cfg.valid_fraction * len(prompts)) if cfg.eval_every else 0
    valid = [prompts[i] for i in sorted(perm[:num_valid])]
    train = [prompts[i] for i in sorted(perm[num_valid:])]
    if len(train) < cfg.ppo.batch_prompts:
        log.warning(
            "%d training prompts for batches of %d: prompts repeat within a batch",
            len(train),
            cfg.ppo.batch_prompts,
        )
    beta = cfg.ppo.beta if cfg.ppo.beta is not None else kl_coefficient(policy_cfg.num_params())
    steps_per_iteration = cfg.ppo.epochs * cfg.ppo.batch_prompts // cfg.ppo.minibatch_prompts
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / cfg.checkpoint.folder
    refuse_fresh_start_over_checkpoints(checkpoint_dir, cfg.checkpoint.resume)

    device = open_run(
        run_dir, cfg, device=cfg.device, collective_timeout_s=cfg.collective_timeout_s
    )
    mesh = build_mesh(cfg.parallel, device=device.type)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    pad = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1

    policy = build_llama(policy_cfg, cfg.parallel, mesh, device=device, seed=cfg.seed)
    reference = build_llama(policy_cfg, cfg.parallel, mesh, device=device)
    value = build_llama(value_cfg, cfg.parallel, mesh, device=device, seed=cfg.seed)
    load_initial_weights(reference, cfg.policy)
    reference.requires_grad_(False)
    reference.eval()
    total_steps = cfg.iterations * steps_per_iteration
    popt, psched = build_optimizer(policy, cfg.optim, total_steps=total_steps)
    vo = dataclasses.replace(cfg.optim, lr=cfg.ppo.value_lr or cfg.optim.lr)
    vopt, vsched = build_optimizer(value, vo, total_steps=total_steps)
    step_policy = GuardedStep(
        popt,
        psched,
        list(policy.parameters()),
        clip_grad_norm=cfg.optim.clip_grad_norm,
        max_nonfinite=5,
    )
    step_value = GuardedStep(
        vopt,
        vsched,
        list(value.parameters()),
        clip_grad_norm=cfg.optim.clip_grad_norm,
        max_nonfinite=5,
    )
    state, early = TrainState(), EarlyStop()
    checkpoints = CheckpointManager(
        checkpoint_dir,
        keep_last=cfg.checkpoint.keep_last,
        async_save=cfg.checkpoint.async_save,
        model_config=policy_cfg,
    )
    states = {
        "model": ModelState(policy),
        "optimizer": OptimizerState(policy, popt),
        "scheduler": psched,
        "value_model": ModelState(value),
        "value_optimizer": OptimizerState(value, vopt),
        "value_scheduler": vsched,
        "train": state,
        "early_stop": early,
    }
    latest = resume_latest(checkpoints, states, resume=cfg.checkpoint.resume, job=cfg)
    if latest is not None:
        log.info("resumed from %s at iteration %d", latest, state.step)
    else:
        load_initial_weights(policy, cfg.policy)
        load_initial_weights(value, value_from)
    scorer = build_scorer(cfg.scorer, tokenizer, parallel=cfg.parallel, mesh=mesh, device=device)
    rollouts = Rollouts(cfg, tokenizer, scorer, mesh, device)
    metrics = metrics_logger(
        run_dir, cfg, train=cfg, total_steps=cfg.iterations, start_step=state.step
    )
    stop = StopSignal()
    per_rank = cfg.ppo.batch_prompts // dp_size
    minibatch_rows = cfg.ppo.minibatch_prompts // dp_size

    @functools.lru_cache(maxsize=2)
    def epoch_prompts(epoch: int) -> list[Prompt]:
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        return [train[i] for i in order]

    def held_out_reward(iteration: int) -> float:
        mine = valid[dp_rank::dp_size]
        responses = rollouts.generate(policy, mine, seed=cfg.seed + 7919 * iteration)
        texts = [rollouts.text(r) for r in responses]
        return _global_mean(rollouts.score(mine, texts)["reward"].tolist(), device)

    try:
        while state.step < cfg.iterations:
            iteration = state.step + 1
            t0 = time.perf_counter()
            # Minibatch k is global rows [k M, (k + 1) M) whatever the layout; rank r holds
            # its r-th slice of each, so its k-th local minibatch is its part of the global one.
            base = state.step * cfg.ppo.batch_prompts
            batch_prompts = [
                q
                for start in range(0, cfg.ppo.batch_prompts, cfg.ppo.minibatch_prompts)
                for q in items_at(
                    epoch_prompts, base + start + dp_rank * minibatch_rows, minibatch_rows
                )
            ]
            responses = rollouts.generate(
                policy, batch_prompts, seed=cfg.seed * 100_003 + iteration * 1009 + dp_rank
            )
            t1 = time.perf_counter()
            texts = [rollouts.text(r) for r in responses]
            scores = rollouts.score(batch_prompts, texts)
            t2 = time.perf_counter()

            prompt_ids = [encode_dialog(tokenizer, q.dialog).ids for q in batch_prompts]
            batch = rollout_rows(prompt_ids, responses, pad_to_multiple_of=pad)
            mask = batch["mask"]
            with torch.no_grad():
                parts = {"old_logprobs": [], "ref_logprobs": [], "old_values": []}
                for chunk in _chunks(batch, range(per_rank), cfg.micro_batch):
                    with loss_context(cfg.parallel):
                        parts["old_logprobs"].append(token_logprobs(policy, chunk, device).cpu())
                        parts["ref_logprobs"].append(token_logprobs(reference, chunk, device).cpu())
                    parts["old_values"].append(token_values(value, chunk, device).cpu())
            t_forward = time.perf_counter()
            for key, values in parts.items():
                batch[key] = torch.cat(values) * mask
            score = whiten(
                logit(scores["reward"]), stats=_global_stats(logit(scores["reward"]), None, device)
            )
            rewards, kl = token_rewards(
                score, batch["old_logprobs"], batch["ref_logprobs"], mask, beta=beta
            )
            advantages, returns = gae(
                rewards, batch["old_values"], mask, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam
            )
            batch["advantages"] = whiten(
                advantages, mask=mask, stats=_global_stats(advantages, mask, device)
            )
            batch["returns"] = returns

            policy_objective = PolicyObjective(cfg.ppo.clip)
            value_objective = ValueObjective(cfg.ppo.value_clip)
            policy_losses, value_losses, grad_norms = [], [], []
            for _ in range(cfg.ppo.epochs):
                for start in range(0, per_rank, minibatch_rows):
                    micro = _chunks(batch, range(start, start + minibatch_rows), cfg.micro_batch)
                    out = forward_backward(
                        policy,
                        micro,
                        parallel=cfg.parallel,
                        device=device,
                        objective=policy_objective,
                    )
                    grad_norms.append(step_policy(out.loss, step=iteration).grad_norm)
                    policy_losses.append(out.loss.item())
                    out = forward_backward(
                        value,
                        micro,
                        parallel=cfg.parallel,
                        device=device,
                        objective=value_objective,
                    )
                    step_value(out.loss, step=iteration)
                    value_losses.append(out.loss.item())
            t3 = time.perf_counter()
            state.step = iteration
            tokens = global_count(int(mask.sum()), parallel=cfg.parallel, device=device)
            state.tokens_seen += tokens
            clip_total = torch.tensor(
                [policy_objective.clipped, float(mask.sum()) * cfg.ppo.epochs], device=device
            )
            if dist.get_world_size() > 1:
                dist.all_reduce(clip_total)
            record = {
                "policy_loss": policy_losses[0],
                "value_loss": value_losses[0],
                "reward": _global_mean(scores["reward"].tolist(), device),
                **{k: _global_mean(v.tolist(), device) for k, v in scores.items() if k != "reward"},
                "kl": _global_mean(kl.sum(1).tolist(), device),
                "entropy": _global_mean((-batch["old_logprobs"][mask]).tolist(), device),
                "clip_fraction": float(clip_total[0] / clip_total[1]),
                "explained_variance": _global_explained_variance(
                    batch["old_values"], returns, mask, device
                ),
                "response_length": _global_mean([float(len(r)) for r in responses], device),
                "grad_norm": grad_norms[-1],
                "generate_s": t1 - t0,
                "score_s": t2 - t1,
                "train_s": t3 - t2,
                # Part of train_s: the rollout rows and the no-grad forwards (old log-probs,
                # reference log-probs, values) before the updates.
                "forward_s": t_forward - t2,
            }
            metrics.advance(iteration)
            metrics.log(iteration, record)
            stopping = False
            if (
                valid
                and cfg.eval_every
                and (iteration % cfg.eval_every == 0 or iteration == cfg.iterations)
            ):
                reward = held_out_reward(iteration)
                early.update(reward)
                metrics.log(iteration, {"reward": reward, "best_reward": early.best}, kind="valid")
                if early.since_best >= cfg.patience:
                    log.warning(
                        "held-out reward has not improved in %d evaluations: stopping", cfg.patience
                    )
                    stopping = True
            signalled = stop.should_stop(device)  # collective: every rank agrees
            if (signalled or iteration == cfg.stop_after) and iteration < cfg.iterations:
                # Asked from outside: unlike early stopping, the run is unfinished (exit 3).
                stopping = True
                state.stopped = (
                    (stop.reason or "a signal to another rank")
                    if signalled
                    else f"stop_after={cfg.stop_after}"
                )
                state.planned_steps = cfg.iterations
            if iteration % cfg.checkpoint.every == 0 or iteration == cfg.iterations or stopping:
                checkpoints.save(iteration, states)
            if stopping:
                break
    finally:
        checkpoints.close()
        stop.restore()
        metrics.close()
    dist.barrier()
    if dist.get_rank() == 0:
        plot_ppo(run_dir)
    dist.barrier()
    return state


def plot_ppo(run_dir: Path) -> Path | None:
    """`ppo_curve.png`: reward (training batch and held out) and KL to the reference per
    iteration, from metrics.jsonl."""
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train" and "kl" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in train]
    left.plot(steps, [r["reward"] for r in train], marker=".", label="batch")
    valid = [r for r in records if r["kind"] == "valid" and "reward" in r]
    if valid:
        left.plot([r["step"] for r in valid], [r["reward"] for r in valid], "o-", label="held out")
    left.set_xlabel("iteration")
    left.set_ylabel("reward")
    left.legend()
    right.plot(steps, [r["kl"] for r in train], marker=".", color="tab:red")
    right.set_xlabel("iteration")
    right.set_ylabel("KL to the reference (per response)")
    fig.tight_layout()
    out = Path(run_dir) / "ppo_curve.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


__all__ = ["PolicyObjective", "ValueObjective", "ppo", "rollout_rows", "validate_ppo"]
