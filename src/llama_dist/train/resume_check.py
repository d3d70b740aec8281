"""Resuming under a changed config: what changed, what may change, and whose optimizer
settings count.

Every checkpoint records the resolved job config it was saved under (`job_record`, written as
`job_config.json` beside `model_config.json`). On resume `check_resume` names each difference
from the new config, one log line each (`key: old -> new`). A difference that changes what
the step counter or the data position means is an error raised before any tensor is loaded,
unless `checkpoint.allow_changes` lists its key:

- the data (`STEP_MEANING`): every `data.*` key - files, sources, mix weights, `seq_len` /
  `max_len`, `seed`, `valid_fraction`, packing, what a sample too long becomes, the pairs per
  epoch - except those that leave the samples and their order as they are (`SAME_SAMPLES`:
  the token cache, the sample-index cache folder and its build timeout, document masks,
  which turns are trained on);
- the batch a step takes: `train.global_batch_tokens` (pretraining, SFT),
  `train.global_batch_pairs` (reward models); in PPO `ppo.batch_prompts`,
  `ppo.minibatch_prompts` and `ppo.epochs` (optimizer steps per iteration), and the prompt
  set and its held-out split: `prompts`, `valid_fraction`, `seed`;
- the schedule (`SCHEDULE`): `train.steps`, `epochs`, `iterations`, `optim.warmup_steps`,
  `optim.min_lr_ratio`, only where they move the learning rate at the resumed step (the
  multiplier of the peak that the saved scheduler reached, against the new schedule's at the
  same step: a longer cosine does, a longer constant schedule does not).

Every other difference (micro batch and so gradient accumulation, layout, logging, evaluation,
`train.stop_after`, the optimizer settings) is logged and takes effect. Optimizer settings
come from the new config: the param groups loaded with the optimizer state hold the saved
run's lr, betas, eps and weight decay, so `keep_new_settings` puts back those of the freshly
built optimizer and sets the schedulers' peak to the new lr, at the resumed step's multiplier.
A checkpoint that records no job config (saved before checkpoints did) cannot be compared:
a log line says so, and the resume goes on.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.optim.lr_scheduler import LambdaLR

from llama_dist.checkpoint import (
    JOB_CONFIG_FILE,
    DamagedCheckpointError,
    OptimizerState,
    describe,
    load_alone,
    step_of,
)

log = logging.getLogger(__name__)

# Keys (and the keys below them) whose change moves the data position or changes the batch a
# step takes.
STEP_MEANING = (
    "data",
    "train.global_batch_tokens",
    "train.global_batch_pairs",
    "ppo.batch_prompts",
    "ppo.minibatch_prompts",
    "ppo.epochs",
    "prompts",
    "valid_fraction",
    "seed",
)
# Data keys that leave the samples and their order as they are.
SAME_SAMPLES = (
    "data.cache",
    "data.cache_dir",
    "data.build_timeout_s",
    "data.document_mask",
    "data.train_on",
)
# Keys that set the length or shape of the learning-rate schedule.
SCHEDULE = ("train.steps", "epochs", "iterations", "optim.warmup_steps", "optim.min_lr_ratio")
# Settings of resuming itself.
_NOT_COMPARED = ("checkpoint.allow_changes", "checkpoint.on_damaged", "checkpoint.resume")


def job_record(cfg: Any) -> dict[str, Any]:
    """The resolved job config (a dataclass) as flat dotted keys with JSON values."""
    return _flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _under(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class _LRShift:
    step: int  # scheduler steps taken
    saved: float  # multiplier of the peak the saved scheduler reached at `step`
    new: float  # the new schedule's at `step`

    def __str__(self) -> str:
        return (
            f"the learning rate at scheduler step {self.step} moves from {self.saved:.6g} to "
            f"{self.new:.6g} of the peak"
        )


def lr_shifts(folder: Path, states: Mapping[str, Any]) -> list[_LRShift]:
    """Where the new schedules of `states` disagree with the saved ones at the resumed step.

    Reads only the schedulers' small entries (no tensor), on the calling process alone.
    """
    stored = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    shifts = []
    for name, scheduler in states.items():
        if not isinstance(scheduler, LambdaLR) or f"{name}._last_lr" not in stored:
            continue
        saved: dict[str, Any] = {"last_epoch": 0, "base_lrs": [], "_last_lr": []}
        load_alone({name: saved}, folder)
        if not saved["base_lrs"] or not saved["base_lrs"][0]:
            continue
        step = int(saved["last_epoch"])
        shift = _LRShift(
            step, saved["_last_lr"][0] / saved["base_lrs"][0], scheduler.lr_lambdas[0](step)
        )
        if not math.isclose(shift.saved, shift.new, rel_tol=1e-6, abs_tol=1e-12):
            shifts.append(shift)
    return sorted(set(shifts), key=lambda s: s.step)


def check_resume(
    folder: Path,
    states: Mapping[str, Any],
    current: Mapping[str, Any] | None,
    *,
    allow: list[str],
) -> tuple[list[tuple[int, str]], str | None]:
    """Compare checkpoint `folder` with the new config `current` (`job_record`); returns the
    log lines (level, text) and the refusal (an error message naming the keys and the fix),
    if any. Reads job_config.json and the schedulers' entries only: call it before loading."""
    shifts = lr_shifts(folder, states)
    lines: list[tuple[int, str]] = []
    config_path = folder / JOB_CONFIG_FILE
    if current is None:
        return [(logging.WARNING, f"{folder.name}: {s}") for s in shifts], None
    if not config_path.is_file():
        lines.append(
            (
                logging.WARNING,
                f"{folder.name} records no job config ({JOB_CONFIG_FILE}: saved before "
                "checkpoints did), so the config cannot be compared with it; resuming under "
                "the new config as it is",
            )
        )
        return lines + [(logging.WARNING, f"{folder.name}: {s}") for s in shifts], None
    try:
        saved = json.loads(config_path.read_text())
    except ValueError as e:
        raise DamagedCheckpointError(folder, f"{JOB_CONFIG_FILE} is not valid JSON ({e})") from e

    missing = object()
    refused: list[str] = []
    schedule_changed = False
    for key in sorted(set(saved) | set(current)):
        if _under(key, _NOT_COMPARED):
            continue
        old, new = saved.get(key, missing), current.get(key, missing)
        if old == new:
            continue
        change = (
            f"{key}: {'(absent)' if old is missing else _show(old)} -> "
            f"{'(absent)' if new is missing else _show(new)}"
        )
        allowed = _under(key, allow)
        if _under(key, STEP_MEANING) and not _under(key, SAME_SAMPLES):
            if allowed:
                lines.append((logging.WARNING, f"{change} (allowed by checkpoint.allow_changes)"))
            else:
                refused.append(key)
                lines.append((logging.ERROR, change))
        elif key in SCHEDULE:
            schedule_changed = True
            if not shifts:
                lines.append(
                    (
                        logging.INFO,
                        f"{change} (the learning rate at the resumed step stays as it was)",
                    )
                )
            elif allowed:
                lines.append(
                    (
                        logging.WARNING,
                        f"{change} (allowed by checkpoint.allow_changes; {shifts[0]})",
                    )
                )
            else:
                refused.append(key)
                lines.append((logging.ERROR, f"{change} ({shifts[0]})"))
        elif key.startswith("optim."):
            lines.append(
                (
                    logging.WARNING,
                    f"{change} (applied: the new value replaces the one "
                    "saved with the optimizer state)",
                )
            )
        else:
            lines.append((logging.INFO, change))
    if shifts and not schedule_changed:
        # e.g. an allowed change of the data that changes the planned steps
        lines.append((logging.WARNING, f"{folder.name}: {shifts[0]}"))
    if not refused:
        return lines, None
    changes = "; ".join(text for level, text in lines if level == logging.ERROR)
    refusal = (
        f"cannot resume from {describe(folder)} under this config: {changes}. These change what "
        f"step {step_of(folder)} means (the data position, the batch a step takes, or the "
        "learning rate at the resumed step). Resume with the checkpoint's values; or, to take "
        f"only its weights, start another run folder with checkpoint.init_from={folder}; or "
        f"accept the change with checkpoint.allow_changes=[{','.join(refused)}]"
    )
    return lines, refusal


@dataclass
class NewSettings:
    """The freshly built optimizers' param-group settings and their schedulers' peaks, taken
    before a checkpoint's replace them."""

    groups: dict[str, list[dict[str, Any]]]
    base_lrs: dict[str, list[float]]


def new_settings(states: Mapping[str, Any]) -> NewSettings:
    return NewSettings(
        groups={
            name: [
                {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
                for group in value.optimizer.param_groups
            ]
            for name, value in states.items()
            if isinstance(value, OptimizerState)
        },
        base_lrs={
            name: list(value.base_lrs)
            for name, value in states.items()
            if isinstance(value, LambdaLR)
        },
    )


def keep_new_settings(states: Mapping[str, Any], fresh: NewSettings) -> list[str]:
    """After a load: put back the new config's optimizer settings and the schedulers' new
    peaks, with each group's lr at the resumed step's multiplier; returns a log line per
    optimizer whose saved settings differed."""
    lines = []
    for name, groups in fresh.groups.items():
        optimizer = states[name].optimizer
        changed: dict[str, tuple[Any, Any]] = {}
        for group, new in zip(optimizer.param_groups, groups, strict=True):
            for key, value in new.items():
                if key != "lr" and group.get(key) != value:
                    changed.setdefault(key, (group.get(key), value))
                group[key] = value
        if changed:
            details = ", ".join(
                f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in changed.items()
            )
            lines.append(
                f"{name}: the new config's settings replace those saved with the optimizer "
                f"state ({details}; initial_lr is the peak learning rate)"
            )
    for name, base_lrs in fresh.base_lrs.items():
        scheduler = states[name]
        scheduler.base_lrs = list(base_lrs)
        step = scheduler.last_epoch
        groups = scheduler.optimizer.param_groups
        for group, base, multiplier in zip(groups, base_lrs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base * multiplier(step)
        scheduler._last_lr = [group["lr"] for group in groups]
    return lines


__all__ = [
    "SAME_SAMPLES",
    "SCHEDULE",
    "STEP_MEANING",
    "NewSettings",
    "check_resume",
    "job_record",
    "keep_new_settings",
    "lr_shifts",
    "new_settings",
]
