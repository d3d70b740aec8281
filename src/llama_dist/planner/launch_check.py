"""The pretraining job's per-GPU memory, estimated by the planner before any process group.

`validate_job` resolves `parallel.grad_sync=auto` here (`resolve_job_grad_sync`), and the
pretraining loop calls `check_job_memory` right after it: the estimate of the job's own layout
(`estimate_memory`: sharded fp32 state, FSDP's buffers, the unsharded gradients grad_sync=last
keeps, activations per recomputation policy, the transient peak) is logged as a short table,
once per node; over the device's memory less `RESERVED_GIB` it is a ValueError naming the
biggest terms and the planner's best layout for the same model, GPUs, sequence and global
batch; within `WARN_FRACTION` of it, a warning. `parallel.memory_check=warn` runs anyway,
`off` skips the check.

The device's memory: on CUDA the device's own (`torch.cuda.get_device_properties`, which
starts no process group), else the GPU `parallel.gpu` names in the planner's table; without
either (a CPU run) it is unknown: the table is logged without a limit, and `grad_sync=auto`
resolves to "last", what CPU runs have always done (bitwise the same results as before).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from llama_dist.models.config import LlamaConfig
from llama_dist.parallel.config import ParallelConfig
from llama_dist.parallel.fsdp import resolve_dtype
from llama_dist.planner.hardware import GIB, GPU, GPUS, get_gpu
from llama_dist.planner.memory import Layout, MemoryEstimate, estimate_memory, resolve_grad_sync
from llama_dist.planner.search import SearchSpace, search

if TYPE_CHECKING:
    from llama_dist.config import TrainConfig

log = logging.getLogger(__name__)

RESERVED_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation (as the planner's)
WARN_FRACTION = 0.9  # of the budget: above it, a warning


@dataclass(frozen=True)
class JobDevice:
    """The GPU a job is checked against: the planner's entry for its speeds (the best layout's
    ranking), with the device's own memory."""

    gpu: GPU
    source: str  # how it was found: "parallel.gpu=h100-sxm" or "cuda:0 NVIDIA H100 80GB HBM3"

    @property
    def budget_bytes(self) -> float:
        return (self.gpu.memory_gib - RESERVED_GIB) * GIB


def _table_entry(name: str, memory_bytes: int) -> GPU:
    """The planner's GPU closest to a CUDA device, with the device's memory."""
    upper = name.upper()
    if "H200" in upper:
        key = "h200"
    elif "H100" in upper:
        key = "h100-sxm"
    elif "A100" in upper:
        key = "a100-80g" if memory_bytes > 60 * GIB else "a100-40g"
    else:
        key = "h100-sxm"  # unknown part: its speeds only rank the suggested layouts
    return replace(GPUS[key], name=name, memory_gib=memory_bytes / GIB)


def job_device(parallel: ParallelConfig, *, device_type: str) -> JobDevice | None:
    """The device this process will train on, if its memory is known (see the module doc)."""
    if device_type == "cuda" and torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        return JobDevice(_table_entry(props.name, props.total_memory), f"cuda:{index} {props.name}")
    if parallel.gpu is not None:
        return JobDevice(get_gpu(parallel.gpu), f"parallel.gpu={parallel.gpu}")
    return None


def job_layout(parallel: ParallelConfig, *, micro_batch: int) -> Layout:
    """The planner's Layout of a validated `parallel` section."""
    return Layout(
        tp=parallel.tp,
        dp_shard=parallel.dp_shard,
        dp_replicate=parallel.dp_replicate,
        micro_batch=micro_batch,
        # Selective recomputation is estimated with the default saved ops (matmuls, attention,
        # reduce-scatters); saving fewer (or every other matmul) keeps less than estimated.
        ac=parallel.ac.mode,
        ac_every=parallel.ac.every,
        sequence_parallel=parallel.sequence_parallel,
        reshard_after_forward=parallel.reshard_after_forward,
        grad_sync=parallel.grad_sync,
        reduce_dtype=parallel.reduce_dtype,
        compile=parallel.compile,
    )


def _estimate_kw(parallel: ParallelConfig, device: JobDevice | None, device_type: str) -> dict:
    # A GPU named on CPU is planned for as that GPU runs: param_dtype=auto is bf16 there.
    dtype = resolve_dtype(parallel.param_dtype, device_type="cuda" if device else device_type)
    p = dtype.itemsize
    return dict(act_bytes=p, param_bytes=p, loss_parallel=parallel.loss_parallel)


def resolve_job_grad_sync(
    model: LlamaConfig,
    *,
    parallel: ParallelConfig,
    train: TrainConfig,
    seq_len: int,
    device_type: str,
) -> str:
    """Resolve `parallel.grad_sync=auto` in place (see `resolve_grad_sync`) for a job whose
    `train` section is validated (grad_accum filled); returns why, and logs the choice once
    per node."""
    if parallel.grad_sync != "auto":
        return "set explicitly"
    device = job_device(parallel, device_type=device_type)
    choice, why = resolve_grad_sync(
        model,
        job_layout(parallel, micro_batch=train.micro_batch),
        budget_bytes=device.budget_bytes if device else None,
        seq_len=seq_len,
        grad_accum=train.grad_accum,
        **_estimate_kw(parallel, device, device_type),
    )
    parallel.grad_sync = choice
    if _node_leader():
        log.info("parallel.grad_sync=auto -> %s: %s", choice, why)
    return why


@dataclass
class MemoryCheck:
    """The outcome of `check_job_memory`."""

    estimate: MemoryEstimate
    device: JobDevice | None
    status: str  # ok | warn | over (run anyway: memory_check=warn) | unknown
    table: str
    message: str = ""  # the warning, where there is one


def _node_leader() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _terms(est: MemoryEstimate) -> list[tuple[str, float]]:
    return [(name, value) for name, value in est.rows() if name != "total"]


def _best_layout(
    model: LlamaConfig,
    device: JobDevice,
    *,
    world_size: int,
    gpus_per_node: int,
    seq_len: int,
    global_batch: int,
) -> str:
    """The planner's best layout for this job, as a sentence ending in its overrides."""
    try:
        fit, too_big = search(
            model,
            device.gpu,
            gpus=world_size,
            gpus_per_node=gpus_per_node,
            seq_len=seq_len,
            global_batch=global_batch,
            space=SearchSpace(grad_sync=["auto"]),
            reserved_gib=RESERVED_GIB,
        )
    except ValueError as e:
        return f"The planner has no layout for this job: {e}."
    job = f"{world_size} x {device.gpu.name}, seq {seq_len}, global batch {global_batch}"
    if not fit:
        if not too_big:
            return f"No layout divides this job ({job})."
        small = too_big[0]
        return (
            f"No layout of this job ({job}) fits; the smallest, {small.layout.describe()}, "
            f"needs {small.memory.total / GIB:.1f} GiB: use more GPUs."
        )
    best = fit[0]
    return (
        f"The planner's best layout for this job ({job}): {best.layout.describe()} "
        f"grad_sync={best.layout.grad_sync}, {best.memory.total / GIB:.1f} GiB, about "
        f"{best.step.tokens_per_s_per_gpu:,.0f} tokens/s/GPU; run it with "
        f"{' '.join(best.layout.overrides())}."
    )


def estimate_job_memory(
    model: LlamaConfig,
    *,
    parallel: ParallelConfig,
    train: TrainConfig,
    seq_len: int,
    world_size: int,
    device_type: str,
    gpus_per_node: int | None = None,
) -> MemoryCheck:
    """This job's per-GPU peak memory against the device's (module doc), with the table and,
    over or close to the budget, the message; logs and raises nothing. Needs a validated job
    (`validate_job`: dp_shard, grad_accum and grad_sync resolved)."""
    if gpus_per_node is None:
        gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", min(world_size, 8)))
    device = job_device(parallel, device_type=device_type)
    grad_accum = train.grad_accum
    layout = job_layout(parallel, micro_batch=train.micro_batch)
    est = estimate_memory(
        model,
        layout,
        seq_len=seq_len,
        grad_accum=grad_accum,
        **_estimate_kw(parallel, device, device_type),
    )
    where = device.source if device else "device memory unknown"
    lines = [
        f"memory per GPU ({where}; {layout.describe()} grad_sync={layout.grad_sync}, "
        f"accumulation {grad_accum}):"
    ]
    lines += [f"  {name:<48} {value / GIB:8.1f} GiB" for name, value in _terms(est)]
    lines.append(f"  {'total (estimate)':<48} {est.total / GIB:8.1f} GiB")
    if device is None:
        return MemoryCheck(est, None, "unknown", "\n".join(lines))
    budget = device.budget_bytes
    lines.append(
        f"  {'budget':<48} {budget / GIB:8.1f} GiB ({device.gpu.memory_gib:.1f} less "
        f"{RESERVED_GIB:.0f} reserved)"
    )
    check = MemoryCheck(est, device, "ok", "\n".join(lines))
    biggest = sorted(_terms(est), key=lambda t: -t[1])[:3]
    named = ", ".join(f"{name} {value / GIB:.1f} GiB" for name, value in biggest)
    if est.total > budget:
        check.status = "over"
        best = _best_layout(
            model,
            device,
            world_size=world_size,
            gpus_per_node=gpus_per_node,
            seq_len=seq_len,
            global_batch=train.global_batch,
        )
        check.message = (
            f"the estimated memory per GPU, {est.total / GIB:.1f} GiB, exceeds the "
            f"{budget / GIB:.1f} GiB budget of {device.source} ({device.gpu.memory_gib:.1f} GiB "
            f"less {RESERVED_GIB:.0f} reserved) for {layout.describe()} "
            f"grad_sync={layout.grad_sync} on {world_size} GPUs; the largest terms: {named}. "
            f"{best} To run this layout anyway: parallel.memory_check=warn"
        )
    elif est.total > WARN_FRACTION * budget:
        check.status = "warn"
        check.message = (
            f"the estimated memory per GPU, {est.total / GIB:.1f} GiB, is within "
            f"{100 * (1 - WARN_FRACTION):.0f}% of the {budget / GIB:.1f} GiB budget of "
            f"{device.source}; the largest terms: {named}"
        )
    return check


def check_job_memory(
    model: LlamaConfig,
    *,
    parallel: ParallelConfig,
    train: TrainConfig,
    seq_len: int,
    world_size: int,
    device_type: str,
    gpus_per_node: int | None = None,
) -> MemoryCheck | None:
    """The pre-launch check: `estimate_job_memory`, its table logged once per node, a
    ValueError when over the budget with parallel.memory_check=error, a warning when over
    with warn or close to it. Returns None with memory_check=off."""
    if parallel.memory_check == "off":
        return None
    check = estimate_job_memory(
        model,
        parallel=parallel,
        train=train,
        seq_len=seq_len,
        world_size=world_size,
        device_type=device_type,
        gpus_per_node=gpus_per_node,
    )
    if _node_leader():
        log.info("%s", check.table)
    if check.status == "over" and parallel.memory_check == "error":
        raise ValueError(check.message)
    if check.message and _node_leader():
        log.warning("%s", check.message)
    return check
