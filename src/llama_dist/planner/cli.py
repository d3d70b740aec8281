"""`python launch/plan.py model=70b cluster.gpus=2048 cluster.gpu=a100-80g`: estimate memory and
speed of every layout of a job and print the fastest that fit.

`validate=true` prints the planner's predictions against published throughputs instead
(`llama_dist.planner.validation`); `out=FILE.md` also writes the table there.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from llama_dist.config import ModelConfig
from llama_dist.models.config import LlamaConfig
from llama_dist.planner.hardware import GIB, GPU, get_gpu
from llama_dist.planner.memory import head_activation_terms, layer_activation_terms
from llama_dist.planner.search import Plan, SearchSpace, search


@dataclass
class ClusterConfig:
    gpu: str = "a100-80g"  # a100-40g | a100-80g | h100-sxm | h200
    gpus: int = 64
    gpus_per_node: int = 8
    reserved_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
    # Overrides of the GPU table (llama_dist/planner/hardware.py); null keeps the table's value.
    nic_gbps: float | None = None  # inter-node bandwidth per GPU, Gb/s
    matmul_eff: float | None = None
    attention_eff: float | None = None
    latency_us: float | None = None  # per ring step across nodes

    def build(self) -> GPU:
        return get_gpu(
            self.gpu,
            nic_bytes_s=None if self.nic_gbps is None else self.nic_gbps * 1e9 / 8,
            matmul_eff=self.matmul_eff,
            attention_eff=self.attention_eff,
            latency_s=None if self.latency_us is None else self.latency_us * 1e-6,
        )


@dataclass
class PlanDataConfig:
    seq_len: int = 4096  # as the trainer's data.seq_len


@dataclass
class PlanTrainConfig:
    global_batch_tokens: int = 4_194_304  # Llama 2: 4M tokens (llama2.md); as the trainer's


@dataclass
class PlanConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="7b"))
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: PlanDataConfig = field(default_factory=PlanDataConfig)
    train: PlanTrainConfig = field(default_factory=PlanTrainConfig)
    search: SearchSpace = field(default_factory=SearchSpace)
    top: int = 5
    validate: bool = False  # print the validation table against published throughputs
    out: str | None = None  # also write the output (markdown) to this file


def register_configs() -> None:
    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def plan_table(plans: list[Plan]) -> list[str]:
    lines = [
        "| # | tp | dp (replicas x shard) | micro-batch | accum | AC | compile | reshard "
        "| grad sync "
        "| memory GiB (state / buffers / activations / total) | step s | exposed comm s "
        "| tokens/s/GPU | MFU |",
        "|---:|---:|---|---:|---:|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for i, p in enumerate(plans, 1):
        lo, m, s = p.layout, p.memory, p.step
        dp = f"{lo.dp_replicate} x {lo.dp_shard}" if lo.dp_replicate > 1 else f"{lo.dp_shard}"
        lines.append(
            f"| {i} | {lo.tp} | {dp} | {lo.micro_batch} | {p.grad_accum} | {lo.ac} | "
            f"{'yes' if lo.compile else 'no'} | "
            f"{lo.reshard_after_forward} | {lo.grad_sync} | {_gib(m.model_state)} / "
            f"{_gib(m.fsdp_buffers)} / {_gib(m.activations)} / {_gib(m.total)} | "
            f"{s.step_s:.2f} | {s.exposed_comm_s:.2f} | {s.tokens_per_s_per_gpu:,.0f} | "
            f"{100 * s.mfu:.1f}% |"
        )
    return lines


def job_overrides(cfg: PlanConfig, seq: int) -> list[str]:
    """The pretraining job's model, sequence and batch as Hydra overrides."""
    model = [f"model={cfg.model.preset}"]
    for name, value in vars(cfg.model).items():
        if name != "preset" and value is not None:
            model.append(f"model.{name}={value}")
    return [
        *model,
        f"data.seq_len={seq}",
        f"train.global_batch_tokens={cfg.train.global_batch_tokens}",
    ]


def breakdown(plan: Plan, model: LlamaConfig, job: list[str]) -> list[str]:
    lo = plan.layout
    lines = [
        f"Best layout: {lo.describe()}; to run it:",
        "",
        f"    torchrun ... launch/pretrain.py {' '.join(job + lo.overrides())}",
        "",
        "| memory per GPU | GiB |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {_gib(v)} |" for name, v in plan.memory.rows()]
    terms = layer_activation_terms(model, p=2, tp=lo.tp, sp=lo.sequence_parallel, ac=lo.ac)
    lines += ["", f"Activations kept per layer and token (bytes, ac={lo.ac}, tp={lo.tp}):", ""]
    lines += [f"- {name}: {v:,.0f}" for name, v in terms.items()]
    head = head_activation_terms(model, p=2, tp=lo.tp, sp=lo.sequence_parallel)
    lines += [f"- outside the layers: {sum(head.values()):,.0f}"]
    s = plan.step
    lines += [
        "",
        f"Step {s.step_s:.2f} s = compute {s.compute_s:.2f} s + exposed communication "
        f"{s.exposed_comm_s:.2f} s (tensor parallel {s.tp_comm_s:.2f} s; FSDP {s.fsdp_comm_s:.2f}"
        f" s in all, mostly overlapped) + optimizer {s.optimizer_s:.3f} s",
    ]
    return lines


def run(cfg: PlanConfig) -> str:
    model = cfg.model.build()
    gpu = cfg.cluster.build()
    seq = cfg.data.seq_len
    if seq <= 0 or cfg.train.global_batch_tokens <= 0 or cfg.train.global_batch_tokens % seq:
        raise ValueError(
            f"train.global_batch_tokens={cfg.train.global_batch_tokens} must be a positive "
            f"multiple of data.seq_len={seq}"
        )
    if model.max_seq_len < seq:
        model = model.replace(max_seq_len=seq)
    global_batch = cfg.train.global_batch_tokens // seq
    fit, too_big = search(
        model,
        gpu,
        gpus=cfg.cluster.gpus,
        gpus_per_node=cfg.cluster.gpus_per_node,
        seq_len=seq,
        global_batch=global_batch,
        space=cfg.search,
        reserved_gib=cfg.cluster.reserved_gib,
    )
    budget = gpu.memory_gib - cfg.cluster.reserved_gib
    lines = [
        f"# Plan: {cfg.model.preset} ({model.num_params():,} parameters) on {cfg.cluster.gpus} x "
        f"{gpu.name} ({cfg.cluster.gpus_per_node} per node)",
        "",
        f"sequence {seq}, global batch {global_batch} sequences ({global_batch * seq:,} tokens); "
        f"memory budget {budget:.1f} GiB per GPU ({gpu.memory_gib} less "
        f"{cfg.cluster.reserved_gib} reserved); "
        f"{len(fit)} of {len(fit) + len(too_big)} layouts fit",
        "",
    ]
    if not fit and not too_big:
        raise ValueError(
            f"no layout divides this job: the global batch of {global_batch} sequences must "
            "divide by micro_batch x dp for some tp in search.tp and micro_batch in "
            f"search.micro_batch (tp={list(cfg.search.tp)}, micro_batch="
            f"{list(cfg.search.micro_batch)}, {cfg.cluster.gpus} GPUs), and tp must divide the "
            "model's heads, FFN and vocabulary; change train.global_batch_tokens, cluster.gpus "
            "or the search lists"
        )
    job = job_overrides(cfg, seq)
    if fit:
        lines += plan_table(fit[: cfg.top]) + [""] + breakdown(fit[0], model, job)
    else:
        lines += ["No layout fits. The smallest:", ""] + plan_table(too_big[: cfg.top])
        lines += ["", "Use more GPUs, a larger tp, full recomputation or a smaller micro-batch."]
    return "\n".join(lines)


def main(cfg) -> int:
    plan_cfg: PlanConfig = OmegaConf.to_object(cfg)
    try:
        if plan_cfg.validate:
            from llama_dist.planner.validation import validation_report

            text = validation_report()
        else:
            text = run(plan_cfg)
    except ValueError as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    print(text)
    if plan_cfg.out:
        Path(plan_cfg.out).write_text(text + "\n")
    return 0
