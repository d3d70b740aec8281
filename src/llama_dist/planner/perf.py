"""Step time of a layout: compute from FLOPs and achievable rates, collectives from bytes and
link bandwidths, and the overlap each layout allows.

Per micro-batch on one GPU:
- matmuls: 6 x (N - N_embedding) x tokens / tp FLOPs, plus one more forward of the blocks under
  full recomputation, at `matmul_eff` of peak;
- attention: causal flash attention does 2 s h FLOPs per token and layer forward and 2.5x that
  backward (it recomputes the scores), at `attention_eff` of peak;
- element-wise work: the bytes the layer's element-wise kernels move forward
  (`layer_elementwise_bytes`, eager or compiled) and about twice that backward, at `hbm_eff` of
  memory bandwidth;
- tensor parallelism: per layer, 2 all-gathers + 2 reduce-scatters forward and again backward
  with sequence parallelism (2 all-reduces each way without), plus those recomputation redoes;
  over NVLink and not overlapped (no async TP);
- FSDP: all-gather of the bf16 weights forward and again backward (unless kept), reduce-scatter
  of fp32 gradients on the micro-batches that sync, over NVLink when the shard group fits in a
  node and over the NICs otherwise, each ring step across nodes costing a latency; overlapped
  with compute by prefetching, except the first gather and the last reduce;
- FSDP's copies: all-gather outputs into the unsharded parameters, gradients cast and copied
  into the reduce-scatter buffer (or accumulated, between micro-batches), at memory bandwidth;
- HSDP: an all-reduce of the gradient shards across replicas on each micro-batch that syncs;
- the optimizer: AdamW reads and writes 28 bytes per local parameter, the gradient norm
  reads 4 more.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_dist.models.config import LlamaConfig
from llama_dist.models.flops import flops_per_token
from llama_dist.planner.hardware import GPU
from llama_dist.planner.memory import (
    Layout,
    block_params,
    head_transient_bytes,
    layer_elementwise_bytes,
    local_param_count,
)


@dataclass
class StepEstimate:
    step_s: float
    compute_s: float  # all micro-batches
    tp_comm_s: float  # exposed
    fsdp_comm_s: float  # total; overlapped with compute where the layout allows
    exposed_comm_s: float  # tp + the part of fsdp not hidden behind compute
    optimizer_s: float
    tokens_per_s_per_gpu: float
    mfu: float


def _ring_time(
    total_bytes: float, n: int, bytes_s: float, *, nodes: int, latency_s: float
) -> float:
    """All-gather or reduce-scatter of `total_bytes` (the unsharded size) over n ranks."""
    if n <= 1:
        return 0.0
    return total_bytes * (n - 1) / n / bytes_s + latency_s * max(nodes - 1, 0)


def group_link(gpu: GPU, size: int, span: int, gpus_per_node: int) -> tuple[float, int]:
    """(bus bandwidth, nodes) of a process group of `size` ranks spread evenly over `span`
    consecutive ranks.

    Within a node: NVLink. Across nodes NCCL runs one ring per NIC, so a node's traffic is shared
    by the NICs of the group's ranks on it: bus bandwidth = NIC bandwidth x ranks per node
    (capped by NVLink, which carries the intra-node hops).
    """
    nvlink = gpu.nvlink_bytes_s * gpu.nvlink_eff
    if span <= gpus_per_node:
        return nvlink, 1
    nodes = span // gpus_per_node
    per_node = max(1, size // nodes)
    return min(nvlink, gpu.nic_bytes_s * gpu.nic_eff * per_node), nodes


def estimate_step(
    cfg: LlamaConfig,
    layout: Layout,
    gpu: GPU,
    *,
    seq_len: int,
    global_batch: int,
    gpus_per_node: int,
    act_bytes: int = 2,
) -> StepEstimate:
    t, L, h = layout.tp, cfg.n_layers, cfg.dim
    accum = global_batch // (layout.micro_batch * layout.dp)
    tokens = layout.micro_batch * seq_len
    peak = gpu.peak_bf16

    # Compute, one micro-batch.
    layer_params = block_params(cfg) * L
    mm = 6 * cfg.num_params(exclude_embedding=True) * tokens / t
    attn = 7 * L * h * seq_len * tokens / t
    if layout.ac == "full":
        mm += 2 * layer_params * tokens / t
        attn += 2 * L * h * seq_len * tokens / t
    layer_bytes = layer_elementwise_bytes(
        cfg, p=act_bytes, tp=t, sp=layout.sequence_parallel, compiled=layout.compile
    )
    passes = 3 + (1 if layout.ac != "none" else 0)  # backward moves about twice forward
    head = 3 * (head_transient_bytes(cfg, p=act_bytes, tp=t) + 8 * cfg.vocab_size / t)
    elementwise = tokens * (passes * L * layer_bytes + head)
    compute = mm / (peak * gpu.matmul_eff) + attn / (peak * gpu.attention_eff)
    compute += elementwise / (gpu.hbm_bytes_s * gpu.hbm_eff)

    # Tensor parallelism, one micro-batch, exposed.
    tp_comm = 0.0
    if t > 1:
        collectives = 8 + {"none": 0, "selective": 2, "full": 4}[layout.ac]
        act = tokens * h * act_bytes
        bw, _ = group_link(gpu, t, t, gpus_per_node)
        tp_comm = L * collectives * (act * (t - 1) / t / bw + 5e-6)

    # FSDP, per micro-batch, and HSDP once per step.
    n = layout.dp_shard
    bw, nodes = group_link(gpu, n, t * n, gpus_per_node)
    params_per_tp = local_param_count(cfg, t, 1)  # one tp rank's share, unsharded over dp
    ring = dict(nodes=nodes, latency_s=gpu.latency_s)
    gather = _ring_time(2 * params_per_tp, n, bw, **ring)
    regather = gather if layout.reshard_after_forward != "never" else 0.0
    reduce = _ring_time(layout.reduce_bytes * params_per_tp, n, bw, **ring)
    replicas = layout.dp_replicate
    all_reduce = 0.0
    if replicas > 1:
        rbw, rnodes = group_link(gpu, replicas, layout.gpus, gpus_per_node)
        shard_bytes = layout.reduce_bytes * params_per_tp / n
        all_reduce = 2 * _ring_time(
            shard_bytes, replicas, rbw, nodes=rnodes, latency_s=gpu.latency_s
        )
    edge = (gather + reduce) / (L + 2)  # first gather and last reduce-scatter: one group each
    # FSDP's own memory traffic on the compute stream: copying each all-gather's output into
    # the unsharded parameters (read + write bf16), and on a syncing micro-batch casting the
    # gradients to the reduce dtype and copying them into the reduce-scatter buffer; on the
    # others, adding them to the unsharded gradients kept between micro-batches.
    hbm = gpu.hbm_bytes_s * gpu.hbm_eff
    rb = layout.reduce_bytes
    copy_gather = (2 * 2 if n > 1 else 0) * (2 if layout.reshard_after_forward != "never" else 1)
    copy_sync = (2 + 3 * rb) * params_per_tp / hbm if n > 1 else 0.0
    copy_accumulate = (2 + 2 * rb) * params_per_tp / hbm if n > 1 else 0.0
    compute += copy_gather * params_per_tp / hbm

    step = compute_total = tp_total = fsdp_total = exposed = 0.0
    for i in range(accum):
        sync = layout.grad_sync == "every" or i == accum - 1
        fsdp = gather + regather + ((reduce + all_reduce) if sync else 0.0)
        busy = compute + (copy_sync if sync else copy_accumulate) + tp_comm
        mb_time = max(busy, fsdp) + (edge if n > 1 else 0.0)
        step += mb_time
        compute_total += compute + (copy_sync if sync else copy_accumulate)
        tp_total += tp_comm
        fsdp_total += fsdp
        exposed += mb_time - busy + tp_comm
    n_local = local_param_count(cfg, t, n)
    optimizer = 32 * n_local / (gpu.hbm_bytes_s * gpu.hbm_eff)
    step += optimizer
    tok_s = global_batch * seq_len / step / layout.gpus
    return StepEstimate(
        step_s=step,
        compute_s=compute_total,
        tp_comm_s=tp_total,
        fsdp_comm_s=fsdp_total,
        exposed_comm_s=exposed,
        optimizer_s=optimizer,
        tokens_per_s_per_gpu=tok_s,
        mfu=tok_s * flops_per_token(cfg, seq_len) / peak,
    )
