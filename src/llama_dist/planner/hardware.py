"""Accelerators and clusters the planner knows, from vendor data sheets.

The achievable fractions (matmul, attention, memory bandwidth, collectives) are typical values
of cuBLAS, FlashAttention-2 and NCCL benchmarks on these parts, fixed in advance; they are not
fitted to the published training throughputs the planner is validated against
(`llama_dist.planner.validation`). The NIC bandwidth, matmul and attention efficiencies and the
latency can be overridden per run (`cluster.*`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    peak_bf16: float  # dense FLOP/s
    memory_gib: float  # what the driver reports
    hbm_bytes_s: float
    nvlink_bytes_s: float  # per GPU, per direction
    nic_bytes_s: float  # inter-node, per GPU (one NIC per GPU, as in DGX/HGX nodes)
    matmul_eff: float  # of peak, for the large bf16 GEMMs of a training step
    attention_eff: float  # of peak, flash attention forward + backward (causal FLOPs)
    hbm_eff: float = 0.7  # of HBM bandwidth, for element-wise kernels
    nvlink_eff: float = 0.8  # NCCL bus bandwidth / link bandwidth, intra-node
    nic_eff: float = 0.8  # NCCL bus bandwidth / NIC bandwidth, inter-node
    latency_s: float = 10e-6  # per collective step across nodes


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        # A100 SXM: 312 TFLOP/s bf16, NVLink 3 (600 GB/s both ways), HDR 200 Gb/s per GPU.
        GPU("a100-40g", 312e12, 40.0, 1.555e12, 300e9, 25e9, matmul_eff=0.75, attention_eff=0.45),
        GPU("a100-80g", 312e12, 80.0, 2.039e12, 300e9, 25e9, matmul_eff=0.75, attention_eff=0.45),
        # H100 SXM: 989 TFLOP/s bf16, NVLink 4 (900 GB/s both ways), NDR 400 Gb/s per GPU.
        GPU("h100-sxm", 989e12, 79.6, 3.35e12, 450e9, 50e9, matmul_eff=0.70, attention_eff=0.40),
        GPU("h200", 989e12, 140.4, 4.8e12, 450e9, 50e9, matmul_eff=0.70, attention_eff=0.40),
    )
}


def get_gpu(name: str, **overrides: float | None) -> GPU:
    """A GPU by name, with any fields overridden (None keeps the table's value)."""
    if name not in GPUS:
        raise ValueError(f"unknown cluster.gpu={name!r}; known: {sorted(GPUS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    for key, value in given.items():
        if not value > 0:
            raise ValueError(f"cluster.{key}={value} must be positive")
    return replace(GPUS[name], **given)
