"""The reward-model loop: pairwise ranking on preference sources mixed by ratio, any layout.

A reward model is the backbone of `init_from` (a chat model) with a fresh scalar head
(`models.reward`); chosen and rejected responses of each pair go through one forward, and the
step's loss is the mean over every pair of all micro-batches on all ranks (`train.step`).
Evaluation gives accuracy per rating bucket (the paper's Table 8) for each source's held-out
pairs, and the unsafe-response recall where responses carry safety labels.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llama_dist.checkpoint.init import load_initial_weights, source_config
from llama_dist.config import (
    RewardJobConfig,
    RewardLossConfig,
    validate_checkpoint,
    validate_loop,
    validate_optim,
)
from llama_dist.data.reward_data import PreferenceLoader, RewardData, valid_pair_batches
from llama_dist.metrics.logger import plot_loss_curve
from llama_dist.models.config import LlamaConfig
from llama_dist.models.reward import HEAD_KEY, reward_config, sequence_rewards
from llama_dist.parallel import build_mesh, dp_rank_and_size
from llama_dist.parallel.config import ParallelConfig
from llama_dist.rlhf.ranking import margin_table, rating_margins, reward_model_loss
from llama_dist.rlhf.reward_metrics import (
    accuracy_by_rating,
    accuracy_counts,
    accuracy_table,
    unsafe_recall,
    unsafe_recall_counts,
)
from llama_dist.train.common import (
    build_training,
    end_of_step,
    finish_step,
    metrics_logger,
    open_run,
    refuse_fresh_start_over_checkpoints,
    resume_latest,
    step_metrics,
    throughput_meter,
)
from llama_dist.train.pretrain import check_tokenizer
from llama_dist.train.step import (
    GarbageCollection,
    StopSignal,
    TrainState,
    data_parallel_sum,
    forward_backward,
    global_count,
)

log = logging.getLogger("llama_dist.train.reward")

EVAL_FILE = "reward_eval.md"
# The paper's lower peak learning rate for its largest reward model (llama2.md).
LARGE_MODEL_PARAMS = 60e9


def reward_model_config(init_from: str) -> LlamaConfig:
    """The reward model's config: `init_from`'s own if it is a reward model already, else its
    backbone with a scalar head."""
    source = source_config(init_from)
    if source.output_dim == 1:
        return source
    if source.output_dim not in (None, source.vocab_size):
        raise ValueError(
            f"{init_from} holds a model with a {source.output_dim}-wide head; a reward model "
            "starts from a language model or continues a reward model (1 output)"
        )
    return reward_config(source)


def validate_loss(loss: RewardLossConfig) -> dict[str, float]:
    """The margin of each rating bucket; checks the loss settings."""
    if loss.margin == "custom":
        if not loss.custom_margins:
            raise ValueError(
                "loss.margin=custom needs loss.custom_margins (rating -> margin for each of "
                "significantly_better, better, slightly_better, negligibly_better)"
            )
        table = margin_table(dict(loss.custom_margins))
    else:
        if loss.custom_margins:
            raise ValueError(
                f"loss.custom_margins is set but loss.margin={loss.margin!r}; set "
                "loss.margin=custom to use them"
            )
        table = margin_table(loss.margin)
    if not (loss.safety_weight >= 0 and math.isfinite(loss.safety_weight)):
        raise ValueError(f"loss.safety_weight={loss.safety_weight} must be a number >= 0")
    return table


def validate_reward(cfg: RewardJobConfig, world_size: int) -> LlamaConfig:
    """Check the job from config files alone (no data read, no process group); returns the
    reward model's config."""
    if not cfg.init_from:
        raise ValueError(
            "init_from is not set; point it at an SFT checkpoint (runs/X/checkpoints) or a "
            "Hugging Face Llama folder"
        )
    if not cfg.tokenizer:
        raise ValueError("tokenizer is not set; pass the base model's tokenizer.model")
    model = reward_model_config(cfg.init_from)
    cfg.data.validate()
    if model.max_seq_len < cfg.data.max_len:
        model = model.replace(max_seq_len=cfg.data.max_len)
    # Rows are padded to a multiple of tp, so sequence parallelism needs no length check.
    cfg.parallel.validate(world_size, model)
    validate_loop(
        cfg.train,
        global_batch=cfg.train.global_batch_pairs,
        dp=cfg.parallel.dp,
        what="pairs (train.global_batch_pairs)",
        fix="change train.global_batch_pairs or train.micro_batch",
    )
    if not cfg.epochs > 0:
        raise ValueError(f"epochs={cfg.epochs} must be positive")
    validate_loss(cfg.loss)
    validate_checkpoint(cfg.checkpoint)
    return model


def planned_steps(data: RewardData, *, global_batch: int, epochs: float, steps: int | None) -> int:
    """Optimizer steps of `epochs` passes over the mix (an incomplete last batch is left
    out), or `steps` if that is fewer."""
    pairs = int(epochs * sum(data.shares))
    from_epochs = pairs // global_batch
    if from_epochs == 0:
        raise ValueError(
            f"{epochs} epochs of {sum(data.shares)} pairs are fewer than one global batch of "
            f"{global_batch}; lower train.global_batch_pairs or add data"
        )
    return min(steps, from_epochs) if steps else from_epochs


def pair_rewards(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (float32) of the chosen and the rejected responses of a `collate_preferences`
    batch, from one forward over both."""
    scores = model(batch["tokens"].to(device, non_blocking=True))
    rewards = sequence_rewards(scores, last_index=batch["last_index"].to(device)).float()
    n = rewards.shape[0] // 2
    return rewards[:n], rewards[n:]


class RankingObjective:
    """The reward-model loss summed over a batch's pairs (`train.step.Objective`)."""

    def __init__(self, margins: dict[str, float], safety_weight: float) -> None:
        self.margins = margins
        self.safety_weight = safety_weight

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["rating_ids"].numel()

    def per_pair(
        self, model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss per pair, chosen rewards, rejected rewards)."""
        chosen, rejected = pair_rewards(model, batch, device)
        loss = reward_model_loss(
            chosen,
            rejected,
            margin=rating_margins(batch["rating_ids"].to(device), self.margins),
            chosen_safe=batch["chosen_safe"].to(device),
            rejected_safe=batch["rejected_safe"].to(device),
            safety_weight=self.safety_weight,
            reduction="none",
        )
        return loss, chosen, rejected

    def loss_sum(
        self, model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        return self.per_pair(model, batch, device)[0].sum()


@torch.no_grad()
def evaluate_reward(
    model: nn.Module,
    data: RewardData,
    objective: RankingObjective,
    *,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    parallel: ParallelConfig,
    device: torch.device,
) -> dict[str, dict[str, torch.Tensor]]:
    """Held-out counts of every source with held-out pairs, summed over all ranks: name ->
    {"accuracy": (5, 2) `accuracy_counts`, "recall": (2,) `unsafe_recall_counts`, "loss":
    (2,) [loss sum, pairs] in float64}."""
    model.eval()
    out = {}
    pad = parallel.tp if parallel.sequence_parallel else 1
    for s, name in enumerate(data.names):
        if not len(data.valid_ids[s]):
            continue
        accuracy = torch.zeros(5, 2, dtype=torch.long, device=device)
        recall = torch.zeros(2, dtype=torch.long, device=device)
        loss = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in valid_pair_batches(
            data,
            s,
            micro_batch=micro_batch,
            dp_rank=dp_rank,
            dp_size=dp_size,
            pad_to_multiple_of=pad,
        ):
            real = batch["pair_mask"].to(device)
            per_pair, chosen, rejected = objective.per_pair(model, batch, device)
            ratings = batch["rating_ids"].to(device)
            accuracy += accuracy_counts(chosen[real], rejected[real], ratings[real])
            labels = torch.cat([batch["chosen_safe"], batch["rejected_safe"]]).to(device)
            both = torch.cat([real, real])
            recall += unsafe_recall_counts(torch.cat([chosen, rejected])[both], labels[both])
            loss += torch.stack([per_pair[real].double().sum(), real.sum().double()])
        # Integer sums stay exact; the loss sum is divided back by the replica count.
        for total in (accuracy, recall, loss):
            data_parallel_sum(total, parallel=parallel)
        out[name] = {"accuracy": accuracy.cpu(), "recall": recall.cpu(), "loss": loss.cpu()}
    model.train()
    return out


def eval_metrics(results: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Flat metrics of `evaluate_reward`: loss and accuracy overall, and per source its
    loss, accuracy per bucket and (with unsafe labels) unsafe recall."""
    metrics: dict[str, float] = {}
    total = torch.zeros(2, dtype=torch.float64)
    correct = torch.zeros(2, dtype=torch.long)
    for name, r in results.items():
        metrics[f"{name}_loss"] = float(r["loss"][0] / r["loss"][1])
        for bucket, acc in accuracy_by_rating(r["accuracy"]).items():
            if not math.isnan(acc):
                metrics[f"{name}_acc_{bucket}"] = acc
        if int(r["recall"][1]):
            metrics[f"{name}_unsafe_recall"] = unsafe_recall(r["recall"])
        total += r["loss"]
        correct += r["accuracy"][-1]
    metrics["loss"] = float(total[0] / total[1])
    metrics["accuracy"] = float(correct[0]) / int(correct[1])
    return metrics


def eval_report(results: dict[str, dict[str, torch.Tensor]], *, step: int) -> str:
    """Markdown: the Table 8 layout with a row per source (and their total), then the unsafe
    recall of the sources with safety labels."""
    rows = {name: r["accuracy"] for name, r in results.items()}
    if len(rows) > 1:
        rows["all"] = sum(rows.values())
    text = f"Reward-model accuracy on held-out pairs, step {step} (%, pairs):\n\n"
    text += accuracy_table(rows)
    recalls = [
        f"- {name}: {100 * unsafe_recall(r['recall']):.1f}% of {int(r['recall'][1])} unsafe "
        "responses scored below 0 (sigmoid < 0.5)"
        for name, r in results.items()
        if int(r["recall"][1])
    ]
    if recalls:
        text += "\nUnsafe-response recall:\n\n" + "\n".join(recalls) + "\n"
    return text


def train_reward_model(cfg: RewardJobConfig, run_dir: Path) -> TrainState:
    """Run (or resume) reward-model training into `run_dir`; every rank calls this."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_cfg = validate_reward(cfg, world_size)
    margins = validate_loss(cfg.loss)
    tokenizer = check_tokenizer(cfg.tokenizer, model_cfg.vocab_size)
    assert tokenizer is not None
    # Before any process group: every rank reads the same files and fails alike.
    data = RewardData(cfg.data, tokenizer)
    if cfg.loss.safety_weight > 0 and not any(
        p.chosen_safe is not None or p.rejected_safe is not None
        for d in data.datasets
        for p in d.pairs
    ):
        raise ValueError(
            f"loss.safety_weight={cfg.loss.safety_weight} but no pair carries chosen_safe / "
            "rejected_safe labels; label the safety data or set loss.safety_weight=0"
        )
    total_steps = planned_steps(
        data, global_batch=cfg.train.global_batch, epochs=cfg.epochs, steps=cfg.train.steps
    )
    large = model_cfg.num_params() >= LARGE_MODEL_PARAMS
    validate_optim(cfg.optim, steps=total_steps, default_lr=5e-6 if large else 1e-5)
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / cfg.checkpoint.folder
    refuse_fresh_start_over_checkpoints(checkpoint_dir, cfg.checkpoint.resume)

    device = open_run(
        run_dir,
        cfg,
        device=cfg.train.device,
        collective_timeout_s=cfg.train.collective_timeout_s,
    )
    rank = dist.get_rank()
    if rank == 0:
        for d in data.datasets:
            for skipped in d.summary.skipped[:10]:
                log.warning("skipped record %s", skipped)
    mesh = build_mesh(cfg.parallel, device=device.type)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    pad = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    loader = PreferenceLoader(
        data,
        global_batch=cfg.train.global_batch,
        micro_batch=cfg.train.micro_batch,
        dp_rank=dp_rank,
        dp_size=dp_size,
        pad_to_multiple_of=pad,
    )
    training = build_training(
        model_cfg,
        parallel=cfg.parallel,
        mesh=mesh,
        device=device,
        optim=cfg.optim,
        train=cfg.train,
        checkpoint=cfg.checkpoint,
        checkpoint_dir=checkpoint_dir,
        loader=loader,
        total_steps=total_steps,
    )
    model, state, checkpoints = training.model, training.state, training.checkpoints
    latest = resume_latest(checkpoints, training.states, resume=cfg.checkpoint.resume, job=cfg)
    if latest is not None:
        log.info("resumed from %s at step %d", latest, state.step)
    else:
        continues = source_config(cfg.init_from).output_dim == 1
        load_initial_weights(model, cfg.init_from, skip=() if continues else (HEAD_KEY,))
        log.info(
            "initialised %s from %s", "the model" if continues else "the backbone", cfg.init_from
        )

    metrics = metrics_logger(
        run_dir, cfg, train=cfg.train, total_steps=total_steps, start_step=state.step
    )
    if state.step == 0:
        metrics.log(0, data.summary, kind="data")
    objective = RankingObjective(margins, cfg.loss.safety_weight)
    throughput = throughput_meter(
        model_cfg, seq_len=cfg.data.max_len, train=cfg.train, parallel=cfg.parallel, device=device
    )
    stop = StopSignal()
    collector = GarbageCollection(cfg.train.gc_every)
    results: dict[str, dict[str, torch.Tensor]] = {}

    def validate(step: int) -> None:
        nonlocal results
        if any(len(v) for v in data.valid_ids):
            results = evaluate_reward(
                model,
                data,
                objective,
                micro_batch=cfg.train.micro_batch,
                dp_rank=dp_rank,
                dp_size=dp_size,
                parallel=cfg.parallel,
                device=device,
            )
            metrics.log(step, eval_metrics(results), kind="valid")

    try:
        if state.step == 0:
            validate(0)
        while state.step < total_steps:
            micro_batches = next(loader)
            local_tokens = sum(int(b["lengths"].sum()) for b in micro_batches)
            tokens = global_count(local_tokens, parallel=cfg.parallel, device=device)
            out = forward_backward(
                model, micro_batches, parallel=cfg.parallel, device=device, objective=objective
            )
            outcome = finish_step(
                training,
                out.loss,
                tokens=tokens,
                throughput=throughput,
                metrics=metrics,
                stop=stop,
                gc=collector,
            )
            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                record = step_metrics(outcome, training, throughput, device)
                metrics.log(state.step, {**record, "epoch": loader.epoch()})
            _, stopping = end_of_step(
                training,
                total_steps=total_steps,
                train=cfg.train,
                checkpoint=cfg.checkpoint,
                validate=validate,
                stop=stop,
                throughput=throughput,
                device=device,
            )
            if stopping:
                break
    finally:
        checkpoints.close()
        stop.restore()
        collector.restore()
        metrics.close()

    dist.barrier()
    if rank == 0:
        plot_loss_curve(run_dir)
        if state.step == total_steps and results:
            report = eval_report(results, step=state.step)
            (run_dir / EVAL_FILE).write_text(report)
            print(report, flush=True)
    dist.barrier()  # every rank returns with the run folder complete
    return state


__all__ = [
    "RankingObjective",
    "eval_report",
    "evaluate_reward",
    "pair_rewards",
    "planned_steps",
    "train_reward_model",
    "validate_reward",
]
