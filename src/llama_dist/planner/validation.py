"""The planner's predictions against published training throughputs.

Each point is a public measurement with the layout its source states; the planner estimates that
layout (or, where the source gives none, the best layout it finds) with its fixed hardware
constants, and the table reports the error. The sources measured other software stacks
(Meta's 2023 stack, torchtitan, fms-fsdp, Megatron-Core, OLMo-core), so the error covers both
the model and the stack difference. `python launch/plan.py validate=true` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

from llama_dist.models.config import LlamaConfig, get_preset
from llama_dist.planner.cli import ClusterConfig
from llama_dist.planner.memory import Layout
from llama_dist.planner.search import SearchSpace, evaluate, search

RESERVED_GIB = 4.0  # as cluster.reserved_gib

# Llama 3 / 3.1 shapes (public configs): 128,256-token vocabulary, 8 kv heads.
LLAMA3_8B = LlamaConfig(
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    vocab_size=128256,
    ffn_hidden_dim=14336,
    rope_theta=500000.0,
    max_seq_len=8192,
)
LLAMA3_70B = LlamaConfig(
    dim=8192,
    n_layers=80,
    n_heads=64,
    n_kv_heads=8,
    vocab_size=128256,
    ffn_hidden_dim=28672,
    rope_theta=500000.0,
    max_seq_len=8192,
)
MODELS = {
    "Llama 2 7B": get_preset("7b"),
    "Llama 2 13B": get_preset("13b"),
    "Llama 2 34B": get_preset("34b"),
    "Llama 2 70B": get_preset("70b"),
    "Llama 3 8B": LLAMA3_8B,
    "Llama 3 70B": LLAMA3_70B,
}


@dataclass(frozen=True)
class Point:
    source: str
    model: str  # a key of MODELS
    gpu: str
    gpus: int
    seq_len: int
    global_batch: int  # sequences
    published: float  # tokens/s/GPU
    layout: Layout | None  # None: the source gives none; use the planner's best
    nic_gbps: float | None = None  # inter-node Gb/s per GPU, where the source states it
    note: str = ""


def _fsdp(
    n: int, mb: int, ac: str, replicas: int = 1, reduce: str = "fp32", compile: bool = False
) -> Layout:
    return Layout(
        dp_shard=n // replicas,
        dp_replicate=replicas,
        micro_batch=mb,
        ac=ac,
        reduce_dtype=reduce,
        compile=compile,
    )


def _fms_rows(source: str, gpu: str, gpus: int, node_gbps: float, published: dict) -> list:
    """fms-fsdp's table for one cluster: Llama 2 at 4k, 2 sequences per GPU, bf16 reduce,
    the same layouts on both clusters; its inter-node bandwidth is read as per node."""
    layouts = {  # size: (recomputation, HSDP replicas, note)
        "7B": ("none", gpus // 8, "HSDP within nodes"),
        "13B": ("selective", 1, "source: AC of every n-th block"),
        "34B": ("full", 1, ""),
        "70B": ("full", 1, ""),
    }
    return [
        Point(
            source,
            f"Llama 2 {size}",
            gpu,
            gpus,
            4096,
            2 * gpus,
            published[size],
            _fsdp(gpus, 2, ac, replicas, "bf16"),
            nic_gbps=node_gbps / 8,
            note=note,
        )
        for size, (ac, replicas, note) in layouts.items()
    ]


TT_A100 = "torchtitan docs/performance.md @0413364, 64 A100 FSDP2"
FMS_A100 = "fms-fsdp (PyTorch blog 2024-03-13), 128 A100, 400 Gb/s read as per node"
FMS_H100 = "fms-fsdp (PyTorch blog 2024-03-13), 96 H100, 800 Gb/s read as per node"
TT_H100 = "torchtitan docs/performance.md @eaea6f6 (Llama 3.1), FSDP"
MCORE = "Megatron-Core (NVIDIA dgxc-benchmarking @143b90d, NeMo 24.09)"
POINTS = [
    Point(
        "Llama 2 paper: 184,320 GPU hours / 2T tokens",
        "Llama 2 7B",
        "a100-80g",
        512,
        4096,
        1024,
        3014,
        None,
        note="GPU count not published (512 assumed); eager; 350-400 W caps",
    ),
    Point(
        "Llama 2 paper: 1,720,320 GPU hours / 2T tokens",
        "Llama 2 70B",
        "a100-80g",
        2048,
        4096,
        1024,
        323,
        None,
        note="GPU count not published (2048 assumed); eager; 350-400 W caps",
    ),
    Point(
        TT_A100,
        "Llama 3 8B",
        "a100-80g",
        64,
        8192,
        64,
        2973,
        _fsdp(64, 1, "selective"),
        note="source: selective op AC (every other matmul recomputed)",
    ),
    Point(TT_A100, "Llama 3 70B", "a100-80g", 64, 8192, 64, 331, _fsdp(64, 1, "full")),
    Point(TT_A100, "Llama 2 13B", "a100-80g", 64, 4096, 128, 2162, _fsdp(64, 2, "none")),
    Point(TT_A100, "Llama 2 70B", "a100-80g", 64, 4096, 128, 353, _fsdp(64, 2, "full")),
    *_fms_rows(FMS_A100, "a100-80g", 128, 400, {"7B": 3700, "13B": 1800, "34B": 700, "70B": 370}),
    *_fms_rows(FMS_H100, "h100-sxm", 96, 800, {"7B": 7500, "13B": 3800, "34B": 1550, "70B": 800}),
    Point(
        TT_H100,
        "Llama 3 8B",
        "h100-sxm",
        8,
        8192,
        16,
        5762,
        _fsdp(8, 2, "selective"),
        note="96 GB HBM2e H100 at 500 W, planned as an SXM part",
    ),
    Point(
        TT_H100,
        "Llama 3 8B",
        "h100-sxm",
        8,
        8192,
        16,
        6667,
        _fsdp(8, 2, "selective", compile=True),
        note="as above, torch.compile",
    ),
    Point(
        TT_H100,
        "Llama 3 8B",
        "h100-sxm",
        128,
        8192,
        256,
        5605,
        _fsdp(128, 2, "selective"),
        nic_gbps=400,
        note="96 GB HBM2e H100 at 500 W, planned as an SXM part",
    ),
    Point(
        MCORE,
        "Llama 3 8B",
        "h100-sxm",
        8,
        8192,
        128,
        10153,
        _fsdp(8, 1, "none", compile=True),
        note="source: TP1 CP2 DP4, fused kernels, AC not stated (planned without); context "
        "parallelism is not modelled, "
        "planned as FSDP 8 compiled",
    ),
    Point(
        MCORE,
        "Llama 3 8B",
        "h100-sxm",
        128,
        8192,
        2048,
        10006,
        _fsdp(128, 1, "none", compile=True),
        note="source: TP1 CP2 DP64; planned as FSDP 128",
    ),
    Point(
        "OLMo-core README @a7de3f6, Llama-8B script, H100",
        "Llama 3 8B",
        "h100-sxm",
        64,
        4096,
        1024,
        9500,
        _fsdp(64, 2, "none", compile=True),
        note="GPU count not stated (64 assumed); torch.compile; source vocabulary ~100k, "
        "planned with Llama 3's 128,256",
    ),
]


@dataclass
class Row:
    point: Point
    layout: Layout
    predicted: float
    mfu: float
    memory_gib: float
    budget_gib: float  # the GPU's memory less the planner's default reserve

    @property
    def over_budget(self) -> bool:
        return self.memory_gib > self.budget_gib

    @property
    def error(self) -> float:
        return self.predicted / self.point.published - 1


def predict(point: Point) -> Row:
    cfg = MODELS[point.model]
    if cfg.max_seq_len < point.seq_len:
        cfg = cfg.replace(max_seq_len=point.seq_len)
    gpu = ClusterConfig(gpu=point.gpu, nic_gbps=point.nic_gbps).build()
    job = dict(seq_len=point.seq_len, global_batch=point.global_batch, gpus_per_node=8)
    if point.layout is None:
        # The source's own stack (2023) was eager.
        fit, _ = search(cfg, gpu, gpus=point.gpus, space=SearchSpace(compile=[False]), **job)
        plan = fit[0]
    else:
        plan = evaluate(cfg, point.layout, gpu, **job)
    return Row(
        point,
        plan.layout,
        plan.step.tokens_per_s_per_gpu,
        plan.step.mfu,
        plan.memory.total / 2**30,
        gpu.memory_gib - RESERVED_GIB,
    )


def validation_rows() -> list[Row]:
    return [predict(p) for p in POINTS]


def validation_report() -> str:
    rows = validation_rows()
    lines = [
        "| source | model | GPUs | seq | layout | published tok/s/GPU | planned tok/s/GPU "
        "| error | planned MFU | planned GiB (over: above the budget) | note |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        p = r.point
        lines.append(
            f"| {p.source} | {p.model} | {p.gpus} x {p.gpu} | {p.seq_len} | "
            f"{r.layout.describe()}{'' if p.layout else ' (planner best)'} | {p.published:,.0f} | "
            f"{r.predicted:,.0f} | {100 * r.error:+.0f}% | {100 * r.mfu:.0f}% | "
            f"{r.memory_gib:.0f}{' (over)' if r.over_budget else ''} | {p.note} |"
        )
    errors = [abs(r.error) for r in rows]
    lines += [
        "",
        f"{len(rows)} points: median absolute error {100 * median(errors):.0f}%, "
        f"largest {100 * max(errors):.0f}%.",
    ]
    return "\n".join(lines)
