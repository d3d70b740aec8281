"""Set-up and bookkeeping the training loops share: the run folder, the optimizer and its
schedule, resuming, the guarded optimizer step, and MFU's peak.

Each loop calls these in its own readable order; none of them owns the loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from llama_dist.checkpoint import CheckpointManager, step_checkpoints
from llama_dist.config import OptimConfig
from llama_dist.lr_schedule import build_lr_scheduler
from llama_dist.metrics.mfu import peak_flops
from llama_dist.parallel import build_adamw, init_distributed
from llama_dist.train.step import clip_and_check

log = logging.getLogger(__name__)


def refuse_fresh_start_over_checkpoints(checkpoint_dir: Path, resume: str) -> None:
    if resume == "none" and step_checkpoints(checkpoint_dir):
        raise ValueError(
            f"{checkpoint_dir} already holds checkpoints and checkpoint.resume=none; use "
            "another run folder (hydra.run.dir / run_name) or checkpoint.resume=auto"
        )


def open_run(run_dir: Path, cfg: Any, *, device: str) -> torch.device:
    """Join the process group, create the run folder and save the resolved config in it
    (rank 0); returns this rank's device."""
    dev = init_distributed(device=device)
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


def resume_latest(
    checkpoints: CheckpointManager, states: dict[str, Any], *, resume: str
) -> Path | None:
    """Load the newest complete checkpoint of this run into `states`, if `resume` is auto and
    there is one; returns its folder."""
    latest = checkpoints.latest() if resume == "auto" else None
    # Rank 0 decides, so every rank loads the same folder even if their views of a shared
    # file system differ for a moment.
    choice = [latest]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is not None:
        checkpoints.load(choice[0], states)
    return choice[0]


@dataclass
class GuardedStep:
    """Clip, then step the optimizer unless the loss or gradient norm is not finite; abort
    after `max_nonfinite` such steps in a row."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[nn.Parameter]
    clip_grad_norm: float
    max_nonfinite: int
    nonfinite_in_a_row: int = 0

    def __call__(self, loss: torch.Tensor, *, step: int) -> tuple[float, bool]:
        """(gradient norm, whether the step was applied) for optimizer step `step`."""
        grad_norm, finite = clip_and_check(self.params, self.clip_grad_norm)
        applied = bool(torch.isfinite(loss)) and finite
        if applied:
            self.optimizer.step()
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
        return grad_norm, applied


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
