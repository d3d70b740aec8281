"""Parts every training loop shares: the accumulation step, evaluation, throughput, signals.

Loops (pretraining now; SFT, reward modelling, PPO later) stay thin and readable by calling
these rather than inheriting from a base trainer.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from llama_dist.losses import IGNORE_INDEX
from llama_dist.metrics.mfu import mfu
from llama_dist.parallel import clip_grad_norm_, loss_context, set_gradient_sync
from llama_dist.parallel.config import ParallelConfig


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> tuple:
    """(inputs, labels, forward kwargs) of a batch.

    Without `labels`, `tokens` holds `seq_len + 1` token windows and the labels are the next
    tokens. With `labels` (bsz, seq_len), already aligned and IGNORE_INDEX on tokens that are
    not trained on (prompts, padding), `tokens` (bsz, seq_len) are the inputs as they are.
    """
    tokens = batch["tokens"].to(device, non_blocking=True)
    kwargs = {
        k: batch[k].to(device, non_blocking=True)
        for k in ("document_ids", "position_ids")
        if k in batch
    }
    if "labels" in batch:
        return tokens, batch["labels"].to(device, non_blocking=True), kwargs
    return tokens[:, :-1], tokens[:, 1:], kwargs


class Objective(Protocol):
    """What one optimizer step minimises: the mean of a per-unit loss over every unit
    (labelled token, preference pair, ...) of all micro-batches on all ranks."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Units of the batch the loss averages over; known before any forward."""
        ...

    def loss_sum(
        self, model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        """The loss summed over the batch's units (a scalar, may be a DTensor)."""
        ...


class NextTokenLoss:
    """Cross entropy summed over labelled tokens (labels != IGNORE_INDEX)."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        if "labels" in batch:
            return int((batch["labels"] != IGNORE_INDEX).sum())
        tokens = batch["tokens"]
        return tokens.shape[0] * (tokens.shape[1] - 1)

    def loss_sum(
        self, model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        inputs, labels, kwargs = model_inputs(batch, device)
        return model(inputs, labels=labels, reduction="sum", **kwargs)


@dataclass
class StepOutput:
    loss: torch.Tensor  # the step's mean loss over all its units (labelled tokens, pairs)
    units: torch.Tensor  # units over all micro-batches and data-parallel ranks, on the device

    @property
    def num_units(self) -> int:
        """`units` read to the host (a synchronisation: for logging steps)."""
        return int(self.units.item())


def data_parallel_sum(t: torch.Tensor, *, parallel: ParallelConfig) -> torch.Tensor:
    """Sum of `t` over the data-parallel ranks (one all-reduce, in place). Ranks of a tensor-
    parallel group hold the same data, so the world sum counts it once per group member and
    is divided by that (exactly, for integer tensors)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        replicas = dist.get_world_size() // parallel.dp
        if t.is_floating_point():
            t /= replicas
        else:
            t //= replicas
    return t


def global_count(local: int, *, parallel: ParallelConfig, device: torch.device) -> int:
    """`local` summed over the data-parallel ranks (`data_parallel_sum`), on the host."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local
    return int(global_count_tensor(local, parallel=parallel, device=device).item())


def global_count_tensor(
    local: int, *, parallel: ParallelConfig, device: torch.device
) -> torch.Tensor:
    """`local` summed over the data-parallel ranks, left on the device (no host sync)."""
    total = torch.tensor(local, dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        data_parallel_sum(total, parallel=parallel)
    return total


def forward_backward(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    parallel: ParallelConfig,
    device: torch.device,
    objective: Objective | None = None,
) -> StepOutput:
    """Accumulate the gradients of one optimizer step over its micro-batches.

    The step's loss is the sum of the objective over the units of all micro-batches on all
    ranks divided by their global count (counted before any backward, one all-reduce), so a
    micro-batch with few labelled tokens weighs as little as it should, whatever the layout
    or the accumulation. FSDP averages gradients over the dp data-parallel ranks, hence the
    factor dp. Gradients are reduced across data-parallel ranks on the last micro-batch only,
    or on every one with `parallel.grad_sync=every`.
    """
    objective = objective or NextTokenLoss()
    # On the device: the count never comes to the host (the step's one sync is the optimizer's).
    count = global_count_tensor(
        sum(objective.count(b) for b in micro_batches), parallel=parallel, device=device
    )
    # A step with nothing to learn from (every label masked) contributes zero gradients.
    units = count.clamp(min=1).to(torch.float32)
    scale = parallel.dp / units
    total = torch.zeros((), device=device)
    accum = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        set_gradient_sync(model, parallel.grad_sync == "every" or i == accum - 1)
        with loss_context(parallel):
            loss_sum = objective.loss_sum(model, batch, device)
            (loss_sum * scale).backward()
        total += _local(loss_sum).detach().float()
    data_parallel_sum(total, parallel=parallel)
    return StepOutput(loss=total / units, units=count)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    parallel: ParallelConfig,
    device: torch.device,
) -> dict[str, float]:
    """Mean validation loss and perplexity over `batches` (this rank's share) and all ranks.

    A batch's `sample_mask` marks filler rows (repeats that keep every rank's batch count
    equal); they run, since forward is collective under FSDP, but do not count.
    """
    model.eval()
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for batch in batches:
        inputs, labels, kwargs = model_inputs(batch, device)
        rows = batch.get("sample_mask", torch.ones(labels.shape[0], dtype=torch.bool))
        labels = labels.masked_fill(~rows.to(device)[:, None], IGNORE_INDEX)
        with loss_context(parallel):
            # Summed in the head, as in training: the batch's logits never exist at once.
            total += _local(model(inputs, labels=labels, reduction="sum", **kwargs)).float()
        count += (labels != IGNORE_INDEX).sum()
    model.train()
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Tensor-parallel ranks add the same sums to both, so the ratio is unchanged.
        dist.all_reduce(total)
        dist.all_reduce(count)
    loss = (total / count.clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class GarbageCollection:
    """Python's collector off in the step loop, with a collection every `every` steps (0:
    automatic, left alone). Every rank collects at the same step, so no rank stalls the
    others at a moment of its own; `restore` turns automatic collection back on."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._was_enabled = gc.isenabled()
        if every > 0:
            gc.disable()
            gc.collect(1)

    def step(self, step: int) -> None:
        if self.every > 0 and step % self.every == 0:
            gc.collect(1)

    def restore(self) -> None:
        if self.every > 0 and self._was_enabled:
            gc.enable()


def clip_and_check(parameters: list[nn.Parameter], max_norm: float) -> tuple[float, bool]:
    """Clip gradients; returns (global norm, whether it is finite)."""
    norm = clip_grad_norm_(parameters, max_norm).item()
    return norm, math.isfinite(norm)


@dataclass
class TrainState:
    """Loop counters saved in checkpoints (a `Stateful`)."""

    step: int = 0
    skipped_steps: int = 0  # steps whose loss or gradient norm was not finite
    tokens_seen: int = 0
    # Not saved: why the loop stopped before its last step (None: it did not stop early) and
    # the step it was to reach; `train.common.run_job` turns them into exit code 3.
    stopped: str | None = None
    planned_steps: int | None = None

    def state_dict(self) -> dict[str, int]:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "tokens_seen": self.tokens_seen,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.tokens_seen = int(state["tokens_seen"])


class StopSignal:
    """Remembers SIGTERM (sent by torchrun, Slurm or a scheduler before killing the job),
    SIGINT (Ctrl-C) and SIGUSR1 so the loop can checkpoint at the end of the step and exit
    cleanly. Ranks agree through `should_stop`, since the signal may reach them at different
    steps.

    After a SIGINT, a second SIGINT or a SIGTERM ends the process at once, without a
    checkpoint (exit code 128 + the signal): a second Ctrl-C, which torchrun passes on to its
    workers as SIGTERM. A watcher thread sees the signals through `signal.set_wakeup_fd`, so
    this works even while the main thread waits inside a collective, where Python handlers
    cannot run. SIGTERM and SIGUSR1 alone never end the process early: schedulers repeat them.
    """

    def __init__(
        self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    ) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_writer.setblocking(False)
        self._previous_wakeup = signal.set_wakeup_fd(
            self._wake_writer.fileno(), warn_on_full_buffer=False
        )
        self._watcher = threading.Thread(target=self._watch, name="stop-signal", daemon=True)
        self._watcher.start()

    @property
    def reason(self) -> str | None:
        """The signal this rank received (e.g. "SIGTERM"), or None."""
        return None if self.received is None else signal.Signals(self.received).name

    def _handle(self, signum, _frame) -> None:
        if self.received is None:
            print(
                f"rank {os.environ.get('RANK', '0')}: {signal.Signals(signum).name}: finishing "
                "the step, saving a checkpoint, then exiting"
                + (" (Ctrl-C again: exit now, without one)" if signum == signal.SIGINT else ""),
                file=sys.stderr,
                flush=True,
            )
        self.received = signum

    def _watch(self) -> None:
        interrupted = False
        while True:
            try:
                data = self._wake_reader.recv(64)
            except OSError:
                return
            if not data:  # restore() closed the other end
                return
            for signum in data:
                if interrupted and signum in (signal.SIGINT, signal.SIGTERM):
                    os.write(
                        2,
                        f"{signal.Signals(signum).name} after SIGINT: exiting now, without a "
                        "checkpoint; the latest complete one is kept\n".encode(),
                    )
                    os._exit(128 + signum)
                interrupted = interrupted or signum == signal.SIGINT

    def flag(self, device: torch.device) -> torch.Tensor:
        """1.0 on every rank if any rank was signalled, as a device tensor: a collective, but
        no host synchronisation (the step folds it into its one; `GuardedStep`)."""
        flag = torch.tensor(float(self.received is not None), device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def should_stop(self, device: torch.device) -> bool:
        return bool(self.flag(device).item())

    def restore(self) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._wake_writer.close()  # the watcher reads end-of-file and returns
        self._watcher.join(timeout=5)
        self._wake_reader.close()


class Throughput:
    """Tokens/s, TFLOP/s and MFU over the training time since the last report."""

    def __init__(self, *, flops_per_token: int, num_devices: int, peak: float | None) -> None:
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.peak = peak
        self._reset()

    def _reset(self) -> None:
        self._start = time.perf_counter()
        self._elapsed = 0.0
        self._tokens = 0
        self._steps = 0

    def pause(self) -> None:
        """Stop the clock for work that is not training (evaluation, checkpoints)."""
        self._elapsed += time.perf_counter() - self._start

    def resume(self) -> None:
        self._start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self._tokens += tokens
        self._steps += 1

    def report(self) -> dict[str, float]:
        elapsed = max(self._elapsed + time.perf_counter() - self._start, 1e-9)
        tps = self._tokens / elapsed
        out = {
            "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / self.num_devices,
            "tflops_per_device": tps * self.flops_per_token / self.num_devices / 1e12,
            "step_time_s": elapsed / max(self._steps, 1),
        }
        if self.peak is not None:
            out["mfu"] = mfu(
                tokens_per_s=tps,
                flops_per_token=self.flops_per_token,
                num_devices=self.num_devices,
                peak=self.peak,
            )
        self._reset()
        return out
