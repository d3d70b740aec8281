"""Set-up and bookkeeping the training loops share: the run folder, the optimizer and its
schedule, resuming, the guarded optimizer step, and MFU's peak.

Each loop calls these in its own readable order; none of them owns the loop.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from llama_dist.checkpoint import (
    CheckpointManager,
    DamagedCheckpointError,
    ModelState,
    OptimizerState,
    damage,
    describe,
    step_checkpoints,
    step_of,
)
from llama_dist.config import CheckpointConfig, LoopConfig, OptimConfig, validate_checkpoint
from llama_dist.config_keys import to_typed_config
from llama_dist.exit_codes import EXIT_STOPPED, EXIT_USER_ERROR
from llama_dist.host_memory import keep_freed_host_memory
from llama_dist.lr_schedule import build_lr_scheduler
from llama_dist.metrics.logger import MetricsLogger, peak_memory_gib
from llama_dist.metrics.mfu import peak_flops
from llama_dist.models.config import LlamaConfig
from llama_dist.models.flops import flops_per_token
from llama_dist.parallel import (
    ParallelConfig,
    build_adamw,
    build_llama,
    clip_grad_norm_,
    init_distributed,
)
from llama_dist.parallel.fsdp import resolve_dtype
from llama_dist.parallel.mesh import DEFAULT_COLLECTIVE_TIMEOUT_S, explain_collective_timeout
from llama_dist.parallel.optim import clip_scale, clips, grad_norm
from llama_dist.train.resume_check import (
    check_resume,
    job_record,
    keep_new_settings,
    new_settings,
)
from llama_dist.train.run_lock import hold_run_folder, release_run_folders
from llama_dist.train.step import GarbageCollection, StopSignal, Throughput, TrainState

log = logging.getLogger(__name__)


def run_entry_point(name: str, loop: Callable[[Any, Path], Any], job: Any) -> None:
    """Run a loop from a Hydra entry point into Hydra's run folder and exit with `run_job`'s
    code. `job` is the composed config (its keys are checked against the schema) or the typed
    job already."""
    from hydra.core.hydra_config import HydraConfig

    code = run_job(name, loop, job, Path(HydraConfig.get().runtime.output_dir))
    if code:
        sys.exit(code)


def run_job(name: str, loop: Callable[[Any, Path], Any], job: Any, run_dir: Path) -> int:
    """Run `loop(job, run_dir)` on this rank; returns the exit code (`llama_dist.exit_codes`).

    A key the schema lacks or another user's mistake (ValueError) is one line on stderr; a
    collective that timed out is re-raised naming the ranks that stopped answering
    (`explain_collective_timeout`); a run stopped early says how to resume. The run folder's
    lock and the process group are always released.
    """
    try:
        result = loop(to_typed_config(job), run_dir)
    except ValueError as e:
        print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except RuntimeError as e:
        explained = explain_collective_timeout(e)
        if explained is not None:
            raise explained from e
        raise
    except KeyboardInterrupt:
        # Ctrl-C outside the training steps (set-up, final samples): nothing to checkpoint.
        print(f"{name}: interrupted outside the training steps", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    finally:
        release_run_folders()
        if dist.is_initialized():
            dist.destroy_process_group()
    stopped = getattr(result, "stopped", None)
    if stopped is None:
        return 0
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"{name}: stopped at step {result.step} of {result.planned_steps} ({stopped}), "
            f"with a checkpoint of that step in {run_dir}. To resume, run the same command "
            f"again (checkpoint.resume=auto). Exit code {EXIT_STOPPED}.",
            file=sys.stderr,
            flush=True,
        )
    return EXIT_STOPPED


def refuse_fresh_start_over_checkpoints(checkpoint_dir: Path, resume: str) -> None:
    if resume == "none" and step_checkpoints(checkpoint_dir):
        raise ValueError(
            f"{checkpoint_dir} already holds checkpoints and checkpoint.resume=none; use "
            "another run folder (hydra.run.dir / run_name) or checkpoint.resume=auto"
        )


def open_run(
    run_dir: Path,
    cfg: Any,
    *,
    device: str,
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
) -> torch.device:
    """Join the process group, take the run folder's lock, create the folder and save the
    resolved config in it (rank 0); returns this rank's device.

    Rank 0 alone takes the lock (`run_lock`); if another live run holds the folder, every
    rank raises the same ValueError, naming that run, before anything in the folder changes.
    """
    dev = init_distributed(device=device, timeout_s=collective_timeout_s)
    if dev.type == "cpu":
        keep_freed_host_memory()
    refusal = [None]
    if dist.get_rank() == 0:
        try:
            hold_run_folder(run_dir)
        except ValueError as e:
            refusal[0] = str(e)
        except OSError as e:  # e.g. a read-only folder: every rank must hear of it
            refusal[0] = f"cannot lock the run folder {run_dir}: {e}"
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise ValueError(refusal[0])
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    dist.barrier()
    return dev


def build_optimizer(
    model: nn.Module, o: OptimConfig, *, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and its warmup + cosine schedule from a validated `OptimConfig`."""
    optimizer = build_adamw(
        model,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
        decay_norms=o.decay_norms,
        implementation=o.implementation,
    )
    scheduler = build_lr_scheduler(
        optimizer, warmup_steps=o.warmup_steps, total_steps=total_steps, min_ratio=o.min_lr_ratio
    )
    return optimizer, scheduler


@dataclass
class Training:
    """What a loop trains and checkpoints: the model, its optimizer and schedule, the loop
    counters, the checkpoint manager and the states it saves, and the guarded step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    checkpoints: CheckpointManager
    states: dict[str, Any]
    step: GuardedStep
    outcome: StepOutcome | None = None  # the last step's


def build_training(
    model_cfg: LlamaConfig,
    *,
    parallel: ParallelConfig,
    mesh: Any,
    device: torch.device,
    optim: OptimConfig,
    train: LoopConfig,
    checkpoint: CheckpointConfig,
    checkpoint_dir: Path,
    loader: Any,
    total_steps: int,
) -> Training:
    """Build the sharded model (initialised from `train.seed`), AdamW and its schedule, and
    the checkpoint manager over model, optimizer, schedule, `loader` and the counters."""
    model = build_llama(model_cfg, parallel, mesh, device=device, seed=train.seed)
    optimizer, scheduler = build_optimizer(model, optim, total_steps=total_steps)
    state = TrainState()
    checkpoints = CheckpointManager(
        checkpoint_dir,
        keep_last=checkpoint.keep_last,
        async_save=checkpoint.async_save,
        model_config=model_cfg,
    )
    states = {
        "model": ModelState(model),
        "optimizer": OptimizerState(model, optimizer),
        "scheduler": scheduler,
        "dataloader": loader,
        "train": state,
    }
    step = GuardedStep(
        optimizer,
        scheduler,
        list(model.parameters()),
        clip_grad_norm=optim.clip_grad_norm,
        max_nonfinite=train.max_nonfinite_steps,
    )
    return Training(model, optimizer, scheduler, state, checkpoints, states, step)


def metrics_logger(
    run_dir: Path, cfg: Any, *, train: LoopConfig, total_steps: int, start_step: int
) -> MetricsLogger:
    """The run's metrics (console, metrics.jsonl, wandb), written by rank 0."""
    return MetricsLogger(
        run_dir,
        enabled=dist.get_rank() == 0,
        total_steps=total_steps,
        start_step=start_step,
        use_wandb=train.wandb,
        wandb_project=train.wandb_project,
        config=OmegaConf.to_container(OmegaConf.structured(cfg)),
    )


def throughput_meter(
    model_cfg: LlamaConfig,
    *,
    seq_len: int,
    train: LoopConfig,
    parallel: ParallelConfig,
    device: torch.device,
) -> Throughput:
    return Throughput(
        flops_per_token=flops_per_token(model_cfg, seq_len),
        num_devices=dist.get_world_size(),
        peak=device_peak_flops(
            device,
            train.peak_tflops,
            resolve_dtype(parallel.param_dtype, device_type=device.type),
        ),
    )


def step_metrics(
    outcome: StepOutcome,
    training: Training,
    throughput: Throughput,
    device: torch.device,
) -> dict[str, float]:
    """What every loop logs after an optimizer step: loss, lr, gradient norm, throughput
    since the last report, peak memory and the count of skipped steps (no host sync: the
    step's outcome holds the values)."""
    return {
        "loss": outcome.loss,
        "lr": training.scheduler.get_last_lr()[0],
        "grad_norm": outcome.grad_norm,
        **throughput.report(),
        "peak_memory_gib": peak_memory_gib(device),
        "skipped_steps": training.state.skipped_steps,
    }


def finish_step(
    training: Training,
    loss: torch.Tensor,
    *,
    tokens: int,
    throughput: Throughput,
    metrics: MetricsLogger,
    stop: StopSignal | None = None,
    gc: GarbageCollection | None = None,
) -> StepOutcome:
    """After a step's `forward_backward`: the guarded optimizer step (with `stop`'s flag in
    its one host sync, read by `end_of_step`) and the counters (step, tokens seen, skipped
    steps, throughput, progress bar), then `gc`'s collection where due."""
    state = training.state
    state.step += 1
    state.tokens_seen += tokens
    flag = None if stop is None else stop.flag(loss.device)
    outcome = training.step(loss, step=state.step, stop_flag=flag)
    training.outcome = outcome
    state.skipped_steps += not outcome.applied
    throughput.add(tokens)
    metrics.advance(state.step)
    if gc is not None:
        gc.step(state.step)
    return outcome


def end_of_step(
    training: Training,
    *,
    total_steps: int,
    train: LoopConfig,
    checkpoint: CheckpointConfig,
    validate: Callable[[int], None],
    stop: StopSignal,
    throughput: Throughput,
    device: torch.device,
) -> tuple[Path | None, bool]:
    """Evaluate and checkpoint where due (every `train.eval_every` / `checkpoint.every` steps,
    at the end, and on a stop request), off the throughput clock. Returns (the checkpoint
    folder saved, if any; whether the loop stops here)."""
    step = training.state.step
    done = step == total_steps
    saved = None
    throughput.pause()
    if (train.eval_every and step % train.eval_every == 0) or done:
        validate(step)
    # Collective: ranks agree even if the signal reached them at different steps. The step's
    # own sync brought the flag back where the loop passed `stop` to finish_step.
    outcome = training.outcome
    if outcome is not None and outcome.stop is not None:
        signalled = outcome.stop
    else:
        signalled = stop.should_stop(device)
    stopping = signalled or step == train.stop_after
    if step % checkpoint.every == 0 or done or stopping:
        saved = training.checkpoints.save(step, training.states)
    throughput.resume()
    if stopping and not done:
        log.warning("stopping after step %d on request (checkpoint saved)", step)
        if signalled:
            training.state.stopped = stop.reason or "a signal to another rank"
        else:
            training.state.stopped = f"train.stop_after={train.stop_after}"
        training.state.planned_steps = total_steps
    return saved, stopping


def resume_latest(
    checkpoints: CheckpointManager,
    states: dict[str, Any],
    *,
    resume: str,
    job: Any = None,
) -> Path | None:
    """Load the newest intact checkpoint of this run into `states`, if `resume` is auto and
    there is one; returns its folder.

    Step folders without DCP's .metadata (a copy without hidden files, a copy cut short) are
    set aside first, whatever `resume` says, so that they neither hide nor block a step
    (`CheckpointManager.set_aside_incomplete`). With `job`, the loop's validated config:

    - every checkpoint saved from here on records it (job_config.json), and the one resumed
      from is compared with it before any tensor is loaded (`resume_check.check_resume`: a
      change of the data position or of what a step means is an error unless
      job.checkpoint.allow_changes lists it); after the load the new config's optimizer
      settings replace those saved with the optimizer state (`resume_check.keep_new_settings`);
    - a damaged newest checkpoint (`checkpoint.damage`, or a read that fails while loading)
      is an error naming the file and the newest intact earlier checkpoint, or, with
      job.checkpoint.on_damaged=previous, is renamed step-N.damaged-<time> and the earlier
      one resumed.

    Rank 0 decides and broadcasts, so every rank loads the same folder even if their views of
    a shared file system differ for a moment, and all raise the same error.
    """
    options = job.checkpoint if job is not None else CheckpointConfig()
    validate_checkpoint(options)  # PPO's section is validated nowhere else
    current = None
    if job is not None:
        current = job_record(job)
        checkpoints.job_config = current
    if dist.get_rank() == 0:
        checkpoints.set_aside_incomplete()
    fresh = new_settings(states)
    failed: dict[Path, str] = {}  # damage found while loading
    while True:
        decision: list[Any] = [(None, None, [])]
        if dist.get_rank() == 0 and resume == "auto":
            decision[0] = _choose_checkpoint(checkpoints, states, options, current, failed)
        dist.broadcast_object_list(decision, src=0)
        folder, refusal, lines = decision[0]
        if dist.get_rank() == 0:
            for level, line in lines:
                log.log(level, "resume: %s", line)
        if refusal is not None:
            raise ValueError(refusal)
        if folder is None:
            return None
        try:
            checkpoints.load(folder, states)
        except DamagedCheckpointError as e:  # every rank: DCP gathers the read failures
            failed[folder] = e.problem
            continue
        for line in keep_new_settings(states, fresh):
            if dist.get_rank() == 0:
                log.warning("resume: %s", line)
        return folder


def _choose_checkpoint(
    checkpoints: CheckpointManager,
    states: dict[str, Any],
    options: CheckpointConfig,
    current: dict[str, Any] | None,
    failed: dict[Path, str],
) -> tuple[Path | None, str | None, list[tuple[int, str]]]:
    """Rank 0: (the folder to load, the error to raise, the lines to log)."""
    if not checkpoints.folder.is_dir():
        return None, None, []
    damaged: list[tuple[Path, str]] = []
    chosen, refusal, lines = None, None, []
    for _, path in reversed(step_checkpoints(checkpoints.folder)):
        problem = failed.get(path) or damage(path)
        if problem is None:
            try:
                lines, refusal = check_resume(path, states, current, allow=options.allow_changes)
            except DamagedCheckpointError as e:
                problem = e.problem
        if problem is None:
            chosen = path
            break
        damaged.append((path, problem))
    if damaged and (options.on_damaged == "error" or chosen is None):
        return None, _damaged_message(damaged, chosen, checkpoints.folder), []
    if refusal is not None:
        return None, refusal, lines
    for path, problem in damaged:
        checkpoints.set_aside_damaged(path, problem)
    return chosen, None, lines


def _damaged_message(damaged: list[tuple[Path, str]], intact: Path | None, folder: Path) -> str:
    newest, problem = damaged[0]
    text = f"{describe(newest)} is damaged: {problem}."
    if len(damaged) > 1:
        more = "; ".join(f"{path.name}: {p}" for path, p in damaged[1:])
        text += f" Damaged too: {more}."
    names = ", ".join(path.name for path, _ in damaged)
    if intact is None:
        return (
            f"{text} No earlier intact checkpoint exists: restore {names} from a copy, or start "
            "another run folder"
        )
    return (
        f"{text} The newest intact earlier checkpoint is {intact.name} (step "
        f"{step_of(intact)}): to resume from it, run again with checkpoint.on_damaged=previous "
        f"({names} then renamed <name>.damaged-<time>, not deleted), or move {names} out of "
        f"{folder} by hand"
    )


@dataclass
class StepOutcome:
    """What an optimizer step's one host synchronisation brings back."""

    grad_norm: float
    applied: bool  # False: the loss or gradient norm was not finite, the update skipped
    loss: float
    stop: bool | None  # a rank was signalled (None: not asked, see GuardedStep)


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` skips its update by a device flag (torch's fused Adam/AdamW take
    `found_inf`, as GradScaler uses them), so no host sync is needed before the step."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups
    )


@dataclass
class GuardedStep:
    """Clip, then step the optimizer unless the loss or gradient norm is not finite; abort
    after `max_nonfinite` such steps in a row.

    One host synchronisation per step: the norm, the loss, the finite check and the stop flag
    come back together in one `.tolist()`. With torch's fused AdamW (the default) the update is
    skipped on the device (`found_inf`), so that sync comes after the step is queued; other
    implementations need it before. The fused kernel also takes the clipping as its
    `grad_scale` (the gradients divided by `clip_scale` as it reads them), which saves a pass
    over every gradient; other implementations scale the gradients first."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[nn.Parameter]
    clip_grad_norm: float
    max_nonfinite: int
    nonfinite_in_a_row: int = 0
    host_syncs: int = 0  # counted, for the tests

    def __call__(
        self, loss: torch.Tensor, *, step: int, stop_flag: torch.Tensor | None = None
    ) -> StepOutcome:
        """The outcome of optimizer step `step`; `stop_flag` (StopSignal.flag) rides along."""
        value = loss.detach().float().reshape(())
        on_device = _skips_on_device(self.optimizer)
        if on_device:
            norm = grad_norm(self.params)
        else:
            norm = clip_grad_norm_(self.params, self.clip_grad_norm)
        norm = norm.to(value.device).reshape(())
        bad = (~(torch.isfinite(norm) & torch.isfinite(value))).float()
        stop = torch.zeros_like(value) if stop_flag is None else stop_flag.to(value)
        packed = torch.stack([norm, value, bad, stop.reshape(())])
        if on_device:
            self.optimizer.found_inf = bad
            if clips(self.clip_grad_norm):
                self.optimizer.grad_scale = clip_scale(norm, self.clip_grad_norm)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
                self.optimizer.__dict__.pop("grad_scale", None)
            grad_norm_value, loss_value, skipped, stopped = packed.tolist()  # the one sync
        else:
            grad_norm_value, loss_value, skipped, stopped = packed.tolist()  # the one sync
            if not skipped:
                self.optimizer.step()
        self.host_syncs += 1
        applied = not skipped
        if applied:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient norm; step skipped", step)
            if self.nonfinite_in_a_row >= self.max_nonfinite:
                raise RuntimeError(
                    f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or "
                    f"gradient norm (step {step}); lower optim.lr, check the data, "
                    "or resume from an earlier checkpoint"
                )
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepOutcome(
            grad_norm_value, applied, loss_value, None if stop_flag is None else bool(stopped)
        )


def device_peak_flops(
    device: torch.device, override_tflops: float | None, param_dtype: torch.dtype
) -> float | None:
    """Peak FLOP/s for MFU: the override, else the table's entry for this GPU; None (no MFU
    logged) on CPUs and on GPUs the table does not know."""
    if override_tflops is not None:
        return peak_flops("", override=override_tflops * 1e12)
    if device.type != "cuda":
        return None
    try:
        dtype = "tf32" if param_dtype == torch.float32 else "bf16"
        return peak_flops(torch.cuda.get_device_name(device), dtype=dtype)
    except ValueError as e:
        log.warning("%s; MFU is not logged", e)
        return None
