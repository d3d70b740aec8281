"""Layout search: every (tp, dp_shard / HSDP, micro-batch, recomputation, resharding, gradient
sync) that divides the job, estimated for memory and speed; the fastest that fit come first."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from llama_dist.models.config import LlamaConfig
from llama_dist.planner.hardware import GIB, GPU
from llama_dist.planner.memory import Layout, MemoryEstimate, estimate_memory, resolve_grad_sync
from llama_dist.planner.perf import StepEstimate, estimate_step


@dataclass
class SearchSpace:
    tp: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    micro_batch: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    ac: list[str] = field(default_factory=lambda: ["none", "selective", "full"])
    hsdp: bool = True  # also try replicas of smaller FSDP groups (dp_shard a multiple of a node)
    reshard_after_forward: list[str] = field(default_factory=lambda: ["default", "never"])
    # "auto" is tried as the trainer resolves it: "every" where "last" does not fit.
    grad_sync: list[str] = field(default_factory=lambda: ["last", "every"])
    reduce_dtype: list[str] = field(default_factory=lambda: ["fp32"])
    compile: list[bool] = field(default_factory=lambda: [False, True])


@dataclass
class Plan:
    layout: Layout
    grad_accum: int
    memory: MemoryEstimate
    step: StepEstimate

    def fits(self, budget_bytes: float) -> bool:
        return self.memory.total <= budget_bytes


def _shard_sizes(dp: int, tp: int, gpus_per_node: int, hsdp: bool) -> list[int]:
    """dp_shard candidates: all of dp, and (HSDP) groups of whole nodes that divide dp."""
    sizes = {dp}
    if hsdp:
        per_node = max(1, gpus_per_node // tp)
        size = per_node
        while size < dp:
            if dp % size == 0:
                sizes.add(size)
            size *= 2
    return sorted(sizes)


def check_job(cfg: LlamaConfig, *, gpus: int, gpus_per_node: int, seq_len: int, global_batch: int):
    if gpus < 1 or gpus_per_node < 1 or seq_len < 1 or global_batch < 1:
        raise ValueError(
            f"cluster.gpus={gpus}, cluster.gpus_per_node={gpus_per_node}, data.seq_len={seq_len} "
            f"and the global batch ({global_batch} sequences) must all be positive"
        )
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise ValueError(
            f"cluster.gpus={gpus} is not a whole number of nodes of {gpus_per_node} GPUs; "
            "use a multiple of cluster.gpus_per_node"
        )


def evaluate(
    cfg: LlamaConfig,
    layout: Layout,
    gpu: GPU,
    *,
    seq_len: int,
    global_batch: int,
    gpus_per_node: int,
) -> Plan:
    """Memory and step time of one layout; raises ValueError, as the trainer would, for a
    layout the trainer cannot run (tp not dividing heads, FFN, vocabulary or sequence...)."""
    layout.parallel_config().validate(layout.gpus, cfg, seq_len=seq_len)
    per_step = layout.micro_batch * layout.dp
    if global_batch % per_step:
        raise ValueError(
            f"global batch {global_batch} is not divisible by micro_batch x dp = {per_step}"
        )
    accum = global_batch // per_step
    memory = estimate_memory(cfg, layout, seq_len=seq_len, grad_accum=accum)
    step = estimate_step(
        cfg, layout, gpu, seq_len=seq_len, global_batch=global_batch, gpus_per_node=gpus_per_node
    )
    return Plan(layout, accum, memory, step)


def search(
    cfg: LlamaConfig,
    gpu: GPU,
    *,
    gpus: int,
    gpus_per_node: int,
    seq_len: int,
    global_batch: int,
    space: SearchSpace,
    reserved_gib: float = 4.0,
) -> tuple[list[Plan], list[Plan]]:
    """(plans that fit, fastest first; plans that do not fit, smallest first)."""
    check_job(
        cfg, gpus=gpus, gpus_per_node=gpus_per_node, seq_len=seq_len, global_batch=global_batch
    )
    budget = (gpu.memory_gib - reserved_gib) * GIB
    fit, too_big = [], []
    seen: set[Layout] = set()
    for tp in space.tp:
        if tp > gpus_per_node or gpus % tp:
            continue  # what else the trainer refuses, evaluate() skips below
        dp = gpus // tp
        for shard, mb, ac, reshard, sync, reduce, comp in itertools.product(
            _shard_sizes(dp, tp, gpus_per_node, space.hsdp),
            space.micro_batch,
            space.ac,
            space.reshard_after_forward,
            space.grad_sync,
            space.reduce_dtype,
            space.compile,
        ):
            if global_batch % (mb * dp):
                continue
            accum = global_batch // (mb * dp)
            if (sync == "every" and accum == 1) or (reshard == "never" and shard == 1):
                continue  # the same plan as its alternative
            layout = Layout(
                tp=tp,
                dp_shard=shard,
                dp_replicate=dp // shard,
                micro_batch=mb,
                ac=ac,
                reshard_after_forward=reshard,
                grad_sync=sync,
                reduce_dtype=reduce,
                compile=comp,
            )
            if sync == "auto":
                sync, _ = resolve_grad_sync(
                    cfg, layout, budget_bytes=budget, seq_len=seq_len, grad_accum=accum
                )
                layout = replace(layout, grad_sync=sync)
            if layout in seen:
                continue  # "auto" resolved to a plan already tried
            seen.add(layout)
            try:
                plan = evaluate(
                    cfg,
                    layout,
                    gpu,
                    seq_len=seq_len,
                    global_batch=global_batch,
                    gpus_per_node=gpus_per_node,
                )
            except ValueError:
                continue  # a layout the trainer would refuse
            (fit if plan.fits(budget) else too_big).append(plan)
    # Fastest first (to 10 tokens/s); among equally fast ones, the one using less memory.
    fit.sort(key=lambda p: (-round(p.step.tokens_per_s_per_gpu, -1), p.memory.total))
    too_big.sort(key=lambda p: p.memory.total)
    return fit, too_big
