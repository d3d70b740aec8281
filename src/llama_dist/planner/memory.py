"""Per-device memory of a training layout: weights, gradients, optimizer state, FSDP buffers,
and activations by the method of Korthikanti et al. (2022), "Reducing Activation
Recomputation in Large Transformer Models".

Activations are counted the way that paper counts them: the bytes of every tensor a layer keeps
from its forward pass for its backward pass, per token, written in terms of the hidden size h,
FFN width f, query heads a, kv heads k (head dim d = h / a), tensor-parallel degree t and the
activation dtype's p bytes. The paper derives 34 h + 5 a s bytes per token for a GPT layer in
fp16 (34 h / t + 5 a s / t with tensor and sequence parallelism, 2 h per layer under full
recomputation). The terms below are the same bookkeeping for this library's Llama layer, which
differs from GPT in ways that matter:

- flash attention keeps no s x s scores (the 5 a s term becomes a 4-byte log-sum-exp per head),
  but keeps q, k and v and its output; with grouped-query attention k and v are kept at the
  kv heads' width (SDPA's enable_gqa shares them without expanding them to every query head);
- SwiGLU keeps four f-wide tensors (w1 out, w3 out, silu out, the product), GeLU's MLP two 4h;
- RMSNorm normalises in fp32 (as Meta's reference does), so it keeps an fp32 copy of its input;
- there is no dropout, so no masks;
- with sequence parallelism, torch's DTensor linear keeps the all-gathered (full-sequence)
  input of the column-parallel matmuls, where Megatron keeps the sharded one and re-gathers.

`tests/planner/test_planner_memory.py` and `benchmarks/activation_memory.py` measure the same
quantities on CPU (MemTracker) for every policy; they agree to within bytes (the tests allow 2%).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llama_dist.models.config import LlamaConfig

GIB = 2**30


@dataclass(frozen=True)
class Layout:
    """One way to lay a job out; the planner's unit of search."""

    tp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    micro_batch: int = 1
    ac: str = "selective"  # none | selective | full
    ac_every: int = 1  # full: recompute every k-th block (the others keep everything)
    sequence_parallel: bool = True
    # FSDP: free the gathered weights after forward ("default": all groups but the last) or keep
    # them until backward ("never": no second all-gather, the unsharded model stays resident).
    reshard_after_forward: str = "default"
    # Reduce-scatter gradients on every micro-batch ("every") or only on the last ("last", which
    # keeps unsharded gradients between micro-batches); "auto" is resolved by
    # `resolve_grad_sync` against a memory budget before anything is estimated.
    grad_sync: str = "last"
    reduce_dtype: str = "fp32"  # gradient reduce-scatter dtype: fp32 | bf16 | fp16
    compile: bool = False  # torch.compile per block (fused element-wise kernels)

    @property
    def reduce_bytes(self) -> int:
        if self.reduce_dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"reduce_dtype {self.reduce_dtype!r} must be fp32, bf16 or fp16")
        return 4 if self.reduce_dtype == "fp32" else 2

    @property
    def dp(self) -> int:
        return self.dp_shard * self.dp_replicate

    @property
    def gpus(self) -> int:
        return self.dp * self.tp

    def parallel_config(self):
        """This layout as the trainer's `parallel` section."""
        from llama_dist.parallel.config import ACConfig, ParallelConfig

        return ParallelConfig(
            dp_replicate=self.dp_replicate,
            dp_shard=self.dp_shard,
            tp=self.tp,
            sequence_parallel=self.sequence_parallel,
            reshard_after_forward=self.reshard_after_forward,
            reduce_dtype=self.reduce_dtype,
            grad_sync=self.grad_sync,
            compile=self.compile,
            ac=ACConfig(mode=self.ac, every=self.ac_every),
        )

    def overrides(self) -> list[str]:
        """The pretraining job's Hydra overrides for this layout."""
        every = [f"parallel.ac.every={self.ac_every}"] if self.ac_every != 1 else []
        return [
            f"parallel.tp={self.tp}",
            f"parallel.dp_shard={self.dp_shard}",
            f"parallel.dp_replicate={self.dp_replicate}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"parallel.ac.mode={self.ac}",
            *every,
            f"parallel.reshard_after_forward={self.reshard_after_forward}",
            f"parallel.grad_sync={self.grad_sync}",
            f"parallel.reduce_dtype={self.reduce_dtype}",
            f"parallel.compile={str(self.compile).lower()}",
            f"train.micro_batch={self.micro_batch}",
        ]

    def describe(self) -> str:
        hsdp = (
            f"{self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 else f"{self.dp_shard}"
        )
        compiled = " compiled" if self.compile else ""
        every = f"/{self.ac_every}" if self.ac_every != 1 else ""
        return f"tp{self.tp} dp{hsdp} mb{self.micro_batch} ac={self.ac}{every}{compiled}"


def _check_ac(ac: str) -> None:
    if ac not in ("none", "selective", "full"):
        raise ValueError(f"activation checkpointing {ac!r} must be none, selective or full")


def layer_activation_terms(
    cfg: LlamaConfig, *, p: int, tp: int = 1, sp: bool = True, ac: str = "none"
) -> dict[str, float]:
    """Bytes per token that one transformer layer keeps for backward, by tensor.

    p: bytes per activation element (2 for bf16, 4 for fp32). With `sp`, tensors on the
    residual stream are sharded over the sequence by `tp`; otherwise they are replicated.
    """
    _check_ac(ac)
    h, f, a = cfg.dim, cfg.hidden_dim, cfg.n_heads
    kd = cfg.num_kv_heads * cfg.head_dim
    t = tp
    ts = tp if (sp and tp > 1) else 1  # divisor of sequence-sharded (residual stream) tensors
    if ac == "full":
        return {"block input (residual stream)": p * h / ts}
    if ac == "selective":
        # Outputs of the saved ops (matmuls, attention, sequence-parallel reduce-scatters) and
        # the block's input; everything else is recomputed from them.
        terms = {
            "block input (residual stream)": p * h / ts,
            "q, k, v projections (mm out)": p * (h + 2 * kd) / t,
            "attention output + log-sum-exp": p * h / t + 4 * a / t,
            "wo out (partial sums under tp)": p * h,
            "w1, w3 out (mm out)": 2 * p * f / t,
            "w2 out (partial sums under tp)": p * h,
        }
        if ts > 1:
            terms["reduce-scatter outputs"] = 2 * p * h / t
        return terms
    norm = (4 * h + 4) / ts + p * h / ts  # fp32 input copy + rstd, and the normed bf16 tensor
    return {
        "attention RMSNorm (fp32 input, rstd, normed)": norm,
        "wq/wk/wv input": p * h,
        "q, k, v (attention inputs, k and v not expanded)": p * (h + 2 * kd) / t,
        "attention output (also the wo input) + log-sum-exp": p * h / t + 4 * a / t,
        "FFN RMSNorm (fp32 input, rstd, normed)": norm,
        "w1/w3 input": p * h,
        "SwiGLU: w1 out, w3 out, silu out, product": 4 * p * f / t,
    }


def layer_elementwise_bytes(
    cfg: LlamaConfig, *, p: int, tp: int = 1, sp: bool = True, compiled: bool = False
) -> float:
    """Bytes per token that one layer's element-wise kernels read and write in forward.

    Eager, each op of `models/llama.py` reads its inputs and writes its output: an RMSNorm
    (cast to fp32, normalise, cast back, scale) moves 24 bytes per element in bf16, the fp32
    complex rotary of q and k 20 (cast, one complex product, cast back), SwiGLU's silu and
    product 10 per FFN element, each residual add 6 (bf16 figures). Grouped-query attention
    moves nothing extra: SDPA's enable_gqa reads the shared k and v heads in place.
    Compiled (fused), a layer moves about what it keeps for backward, written once and read
    once.
    """
    if compiled:
        return 2 * layer_activation_bytes(cfg, p=p, tp=tp, sp=sp, ac="none")
    h, f = cfg.dim, cfg.hidden_dim
    kd = cfg.num_kv_heads * cfg.head_dim
    t = tp
    ts = tp if (sp and tp > 1) else 1
    norms_and_adds = 2 * (4 * p + 16) * h / ts + 2 * 3 * p * h / ts
    rotary = (16 + 2 * p) * (h + kd) / t
    swiglu = 5 * p * f / t
    return norms_and_adds + rotary + swiglu


def layer_activation_bytes(cfg: LlamaConfig, **kw) -> float:
    """Bytes per token one layer keeps for backward (sum of `layer_activation_terms`)."""
    return sum(layer_activation_terms(cfg, **kw).values())


def head_activation_terms(
    cfg: LlamaConfig, *, p: int, tp: int = 1, sp: bool = True, loss_parallel: bool = True
) -> dict[str, float]:
    """Bytes per token kept outside the layers: final norm, output matmul input, the fp32
    log-softmax of the cross entropy, token ids and labels."""
    h, v = cfg.dim, cfg.vocab_size
    ts = tp if (sp and tp > 1) else 1
    tv = tp if loss_parallel else 1
    return {
        "final RMSNorm": (4 * h + 4) / ts + p * h / ts,
        "output matmul input": p * h,
        "fp32 log-softmax (cross entropy)": 4 * v / tv,
        "token ids, labels (int64)": 16,
    }


def head_transient_bytes(cfg: LlamaConfig, *, p: int, tp: int = 1, loss_parallel: bool = True):
    """Extra bytes per token alive at the loss: the logits in the compute dtype and, for
    bf16, their fp32 copy (the log-softmax output is already counted as kept)."""
    tv = tp if loss_parallel else 1
    return (p + (4 if p < 4 else 0)) * cfg.vocab_size / tv


@dataclass
class MemoryEstimate:
    """Bytes one device holds at its peak (the backward of the first layer)."""

    params: float  # sharded fp32 master weights
    grads: float  # sharded fp32 gradients
    optimizer: float  # AdamW exp_avg + exp_avg_sq
    fsdp_buffers: float  # gathered bf16 weights and unsharded gradients in flight
    activations_kept: float  # kept for backward, all layers + head, one micro-batch
    activations_transient: float  # one layer recomputed in backward, or the loss's logits
    tokens: int  # tokens per micro-batch
    local_params: float
    # The part of fsdp_buffers that is the whole model's unsharded gradients, kept between
    # micro-batches by grad_sync=last.
    unsharded_grads: float = 0.0

    @property
    def model_state(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def activations(self) -> float:
        return self.activations_kept + self.activations_transient

    @property
    def in_flight(self) -> float:
        """FSDP buffers other than the gradients kept between micro-batches."""
        return self.fsdp_buffers - self.unsharded_grads

    @property
    def total(self) -> float:
        return self.model_state + self.fsdp_buffers + self.activations

    def rows(self) -> list[tuple[str, float]]:
        return [
            ("parameters (fp32 shards)", self.params),
            ("gradients (fp32 shards)", self.grads),
            ("AdamW state (fp32 shards)", self.optimizer),
            ("FSDP buffers (gathered weights, grads in flight)", self.in_flight),
            ("unsharded grads kept between micro-batches", self.unsharded_grads),
            ("activations kept for backward", self.activations_kept),
            ("activations transient (recompute / logits)", self.activations_transient),
            ("total", self.total),
        ]


def local_param_count(cfg: LlamaConfig, tp: int, dp_shard: int) -> float:
    """Parameters one rank holds: matrices split over tp, norm weights replicated over tp,
    everything sharded over dp_shard."""
    norms = cfg.n_layers * 2 * cfg.dim + cfg.dim
    return ((cfg.num_params() - norms) / tp + norms) / dp_shard


def block_params(cfg: LlamaConfig) -> int:
    """Parameters of one transformer block (an FSDP group)."""
    return (cfg.num_params() - cfg.dim - 2 * cfg.vocab_size * cfg.dim) // cfg.n_layers


def estimate_memory(
    cfg: LlamaConfig,
    layout: Layout,
    *,
    seq_len: int,
    grad_accum: int,
    act_bytes: int = 2,
    param_bytes: int = 2,
    loss_parallel: bool = True,
) -> MemoryEstimate:
    """Peak per-device bytes of a layout (fp32 master weights, bf16 compute by default)."""
    _check_ac(layout.ac)
    if layout.grad_sync not in ("last", "every"):
        raise ValueError(
            f"grad_sync {layout.grad_sync!r} must be last or every; resolve auto against a "
            "memory budget first (resolve_grad_sync)"
        )
    t, sp = layout.tp, layout.sequence_parallel
    reduce_bytes = layout.reduce_bytes
    tokens = layout.micro_batch * seq_len
    n_local = local_param_count(cfg, t, layout.dp_shard)
    params, grads, optimizer = 4 * n_local, 4 * n_local, 8 * n_local

    # FSDP: one block gathered and the next prefetched, in forward and in backward, plus that
    # block's unsharded gradients (compute dtype, then reduce dtype for the reduce-scatter).
    # The root group (embedding, output, final norm) stays gathered through the step.
    blk = block_params(cfg) / t
    root = (2 * cfg.vocab_size * cfg.dim) / t + cfg.dim
    buffers = 2 * param_bytes * blk + (param_bytes + reduce_bytes) * blk
    buffers += param_bytes * root + reduce_bytes * root
    if layout.reshard_after_forward == "never" and layout.dp_shard > 1:
        buffers += param_bytes * blk * (cfg.n_layers - 2)  # every block stays gathered
    unsharded_grads = 0.0
    if layout.grad_sync == "last" and grad_accum > 1 and layout.dp > 1:
        # Between micro-batches FSDP keeps the whole model's unsharded gradients (reduce dtype).
        unsharded_grads = reduce_bytes * (blk * cfg.n_layers + root)
        buffers += unsharded_grads

    per_layer = layer_activation_bytes(cfg, p=act_bytes, tp=t, sp=sp, ac=layout.ac)
    head = sum(
        head_activation_terms(cfg, p=act_bytes, tp=t, sp=sp, loss_parallel=loss_parallel).values()
    )
    # Full recomputation of every k-th block (blocks 0, k, 2k, ...): the others keep everything.
    recomputed = -(-cfg.n_layers // layout.ac_every) if layout.ac == "full" else cfg.n_layers
    if recomputed < cfg.n_layers:
        plain = layer_activation_bytes(cfg, p=act_bytes, tp=t, sp=sp, ac="none")
        per_layer = (recomputed * per_layer + (cfg.n_layers - recomputed) * plain) / cfg.n_layers
    kept = tokens * (cfg.n_layers * per_layer + head)
    recompute = 0.0
    if layout.ac != "none":
        recompute = tokens * layer_activation_bytes(cfg, p=act_bytes, tp=t, sp=sp, ac="none")
    logits = tokens * head_transient_bytes(cfg, p=act_bytes, tp=t, loss_parallel=loss_parallel)
    gathered = layout.dp_shard > 1 or param_bytes != 4  # a single fp32 shard is used in place
    return MemoryEstimate(
        params=params,
        grads=grads,
        optimizer=optimizer,
        fsdp_buffers=buffers if gathered else 0.0,
        activations_kept=kept,
        activations_transient=max(recompute, logits),
        tokens=tokens,
        local_params=n_local,
        unsharded_grads=unsharded_grads if gathered else 0.0,
    )


def resolve_grad_sync(
    cfg: LlamaConfig,
    layout: Layout,
    *,
    budget_bytes: float | None,
    seq_len: int,
    grad_accum: int,
    **estimate_kw,
) -> tuple[str, str]:
    """(grad_sync, why) for a layout with grad_sync=auto: "every" when the unsharded gradients
    kept by "last" would not fit beside the rest in `budget_bytes`, else "last" (also when the
    budget is unknown: None). An explicit "last" or "every" is returned as it is."""
    if layout.grad_sync != "auto":
        return layout.grad_sync, "set explicitly"
    kw = dict(seq_len=seq_len, grad_accum=grad_accum, **estimate_kw)
    last = estimate_memory(cfg, replace(layout, grad_sync="last"), **kw)
    if not last.unsharded_grads:
        return "last", "nothing is kept between micro-batches (one micro-batch per step or dp 1)"
    grads = f"{last.unsharded_grads / GIB:.1f} GiB"
    if budget_bytes is None:
        return "last", f"device memory unknown; last keeps {grads} of unsharded gradients"
    if last.total <= budget_bytes:
        return "last", (
            f"with last's {grads} of unsharded gradients the estimate, "
            f"{last.total / GIB:.1f} GiB, fits the {budget_bytes / GIB:.1f} GiB budget"
        )
    rest = last.total - last.unsharded_grads
    return "every", (
        f"last's {grads} of unsharded gradients would not fit beside the rest "
        f"({rest / GIB:.1f} GiB) in the {budget_bytes / GIB:.1f} GiB budget"
    )
