"""The step loop's host synchronisations, skipped steps and garbage collection.

A step of the real loop's pieces (forward_backward, finish_step with the stop flag,
end_of_step) on 2 gloo ranks under FSDP, with every tensor-to-host read (`item`, `tolist`,
`bool`, `float`, `int`) counted by a TorchFunctionMode: one per step, on steps that neither log,
evaluate nor save. A non-finite step is skipped on the device by the fused AdamW exactly as the
host-checked path (foreach) skips it.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from llama_dist.config import CheckpointConfig, LoopConfig, OptimConfig
from llama_dist.models.config import get_preset
from llama_dist.parallel import ParallelConfig, build_llama, build_mesh
from llama_dist.testing.distributed import run_distributed
from llama_dist.train.common import (
    GuardedStep,
    Training,
    build_optimizer,
    end_of_step,
    finish_step,
)
from llama_dist.train.step import (
    GarbageCollection,
    StopSignal,
    Throughput,
    TrainState,
    forward_backward,
)

MODEL = get_preset("debug").replace(n_layers=2, vocab_size=256)
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}


class CountHostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


class NoMetrics:
    def advance(self, step: int) -> None:
        pass


class NoCheckpoints:
    def save(self, step, states):  # pragma: no cover - not due in these steps
        raise AssertionError("no checkpoint is due")


def training(implementation: str, seed: int = 0) -> Training:
    parallel = ParallelConfig().validate(2, MODEL)
    model = build_llama(
        MODEL, parallel, build_mesh(parallel), device=torch.device("cpu"), seed=seed
    )
    optim = OptimConfig(lr=1e-3, warmup_steps=0, implementation=implementation)
    optimizer, scheduler = build_optimizer(model, optim, total_steps=100)
    step = GuardedStep(
        optimizer, scheduler, list(model.parameters()), clip_grad_norm=1.0, max_nonfinite=3
    )
    return Training(model, optimizer, scheduler, TrainState(), NoCheckpoints(), {}, step)


def batches(step: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return [{"tokens": torch.randint(0, MODEL.vocab_size, (2, 17), generator=g)} for _ in range(2)]


def run_steps(t: Training, steps: range, *, poison: int | None = None, count=None) -> list:
    parallel = ParallelConfig().validate(2, MODEL)
    device = torch.device("cpu")
    stop = StopSignal()
    throughput = Throughput(flops_per_token=1, num_devices=2, peak=None)
    loop = LoopConfig(eval_every=1000, stop_after=None)
    ckpt = CheckpointConfig(every=1000)
    outcomes = []
    try:
        for s in steps:
            with count or _nothing():
                out = forward_backward(t.model, batches(s), parallel=parallel, device=device)
                loss = out.loss * math.nan if s == poison else out.loss
                outcome = finish_step(
                    t, loss, tokens=68, throughput=throughput, metrics=NoMetrics(), stop=stop
                )
                end_of_step(
                    t,
                    total_steps=1000,
                    train=loop,
                    checkpoint=ckpt,
                    validate=lambda step: None,
                    stop=stop,
                    throughput=throughput,
                    device=device,
                )
            outcomes.append(outcome)
    finally:
        stop.restore()
    return outcomes


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def params(t: Training) -> list[torch.Tensor]:
    return [p.detach().to_local().clone() for p in t.model.parameters()]


def sync_worker() -> dict:
    out: dict = {}
    fused = training("fused")
    counter = CountHostReads()
    run_steps(fused, range(1, 2))  # warm-up: lazy optimizer state
    run_steps(fused, range(2, 5), count=counter)
    out["reads"] = counter.reads
    out["syncs"] = fused.step.host_syncs

    # A non-finite step skipped on the device (fused) and on the host (foreach): the same
    # parameters afterwards, and equal to a run that never saw the poisoned step's update.
    results = {}
    for impl in ("fused", "foreach"):
        t = training(impl, seed=1)
        outcomes = run_steps(t, range(1, 5), poison=2)
        results[impl] = (params(t), [o.applied for o in outcomes], t.state.skipped_steps)
        out[impl + "_norms"] = [o.grad_norm for o in outcomes if o.applied]
        results[impl + "_steps"] = int(t.optimizer.state[next(iter(t.model.parameters()))]["step"])
    out["fused_params"], out["fused_applied"], out["fused_skipped"] = results["fused"]
    out["foreach_params"], out["foreach_applied"], _ = results["foreach"]
    out["adam_steps"] = (results["fused_steps"], results["foreach_steps"])
    return out


def test_one_host_sync_per_step_and_skips_agree():
    result = run_distributed(sync_worker, 2)
    # Three steps, one read each: the packed norm/loss/finite/stop values.
    assert result["reads"] == ["tolist"] * 3, result["reads"]
    assert result["syncs"] == 4
    assert result["fused_applied"] == [True, False, True, True]
    assert result["foreach_applied"] == [True, False, True, True]
    assert result["fused_skipped"] == 1
    # Clipping acts on every applied step: the fused path's grad_scale is compared with
    # foreach's scaled gradients.
    assert min(result["fused_norms"]) > 1.0, result["fused_norms"]
    assert result["fused_norms"] == pytest.approx(result["foreach_norms"], rel=1e-5)
    # AdamW's step counter counts the applied steps only, on both paths.
    assert result["adam_steps"] == (3, 3)
    for a, b in zip(result["fused_params"], result["foreach_params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_garbage_collection_is_off_in_the_loop_and_runs_every_n_steps(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation))
    assert gc.isenabled()
    collector = GarbageCollection(every=3)
    try:
        assert not gc.isenabled()
        for step in range(1, 8):
            collector.step(step)
    finally:
        collector.restore()
    assert gc.isenabled()
    assert calls == [1, 1, 1]  # at start, steps 3 and 6

    calls.clear()
    automatic = GarbageCollection(every=0)
    assert gc.isenabled()
    automatic.step(3)
    automatic.restore()
    assert calls == [] and gc.isenabled()
