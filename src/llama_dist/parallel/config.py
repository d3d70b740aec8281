"""Parallelism configuration: the layout of the world and how each layer is applied.

world = dp_replicate x dp_shard x tp. pp and cp are named axes reserved for pipeline and
context parallelism; they must be 1 for now. `ParallelConfig.validate` checks a layout against
the world size and the model before any process group or model exists. The pretraining job's
validation then resolves `grad_sync=auto` and checks the per-GPU memory with the planner
(`llama_dist.planner.launch_check`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llama_dist.models.config import LlamaConfig
from llama_dist.planner.hardware import GPUS

AC_MODES = ("none", "full", "selective")
RESHARD_POLICIES = ("always", "never", "default")
GRAD_SYNC_POLICIES = ("last", "every", "auto")
MEMORY_CHECKS = ("error", "warn", "off")
DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class ACConfig:
    """Activation recomputation (Korthikanti et al. 2022)."""

    mode: str = "none"  # none | full | selective
    # full: recompute every `every`-th block (1 = all blocks, 2 = every other block, ...)
    every: int = 1
    # selective: ops whose outputs are saved; the rest of each block is recomputed. Names are
    # groups ("mm", "sdpa", "reduce_scatter") resolved per device, or exact "aten.x.overload".
    saved_ops: list[str] = field(default_factory=lambda: ["mm", "sdpa", "reduce_scatter"])
    # selective: save only every other matmul output (torchtitan's "op" policy); halves the
    # matmul activations at the cost of recomputing half of the matmuls.
    save_every_other_mm: bool = False

    def validate(self) -> None:
        if self.mode not in AC_MODES:
            raise ValueError(f"parallel.ac.mode={self.mode!r} must be one of {AC_MODES}")
        if self.every < 1:
            raise ValueError(f"parallel.ac.every={self.every} must be >= 1 (1 = every block)")
        if self.mode == "selective" and not self.saved_ops and not self.save_every_other_mm:
            raise ValueError(
                "parallel.ac.mode=selective with no saved_ops recomputes everything; "
                "use mode=full, or list ops to save (e.g. [mm, sdpa])"
            )


@dataclass
class ParallelConfig:
    """How one model is spread over the world."""

    dp_replicate: int = 1  # data-parallel replicas (HSDP's replicate axis)
    dp_shard: int = -1  # FSDP shards within a replica; -1 = whatever the other axes leave
    tp: int = 1  # tensor-parallel degree (within a node on GPUs)
    pp: int = 1  # reserved: pipeline parallel
    cp: int = 1  # reserved: context parallel
    sequence_parallel: bool = True  # with tp > 1: shard norms and the residual stream on seq
    loss_parallel: bool = True  # with tp > 1: cross entropy over the vocab-sharded logits
    # FSDP: free the all-gathered parameters after forward: always, never, or for all groups
    # but the last (whose backward starts right away, so re-gathering would be wasted).
    reshard_after_forward: str = "default"
    forward_prefetch: int = 1  # groups whose all-gather is issued ahead in forward (0: none)
    backward_prefetch: int = 1  # groups whose all-gather is issued ahead in backward
    param_dtype: str = "auto"  # compute dtype of all-gathered params: auto = bf16 on GPU
    reduce_dtype: str = "fp32"  # gradient reduce-scatter / all-reduce dtype
    # Gradient accumulation: reduce gradients on the last micro-batch only ("last": least
    # communication, but FSDP keeps the whole model's unsharded gradients in between) or on
    # every micro-batch ("every": reduce-scatters each time, only sharded gradients are kept).
    # auto: the pretraining job's validation picks "every" when the planner's estimate with
    # "last" does not fit the device's memory, else "last" (also where the memory is unknown:
    # CPU runs without parallel.gpu). Loops that do not resolve it reduce on the last one.
    grad_sync: str = "auto"  # last | every | auto
    # The GPU whose memory the pre-launch check plans for, named as in the planner's table
    # (llama_dist/planner/hardware.py: a100-40g, a100-80g, h100-sxm, h200). On CUDA the device's
    # own memory is used instead; on CPU, without it, the memory is unknown and not checked.
    gpu: str | None = None
    # Estimated per-GPU memory over the device's: error (before any process group) | warn
    # (run anyway) | off (no estimate).
    memory_check: str = "error"
    ac: ACConfig = field(default_factory=ACConfig)
    compile: bool = False  # torch.compile each transformer block

    def __post_init__(self) -> None:
        if isinstance(self.ac, dict):
            self.ac = ACConfig(**self.ac)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def resolve(self, world_size: int) -> ParallelConfig:
        """Fill dp_shard=-1 from the world size; returns self."""
        for name in ("dp_replicate", "tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.dp_shard == -1:
            rest = self.dp_replicate * self.tp * self.pp * self.cp
            if world_size % rest:
                raise ValueError(
                    f"world size {world_size} is not divisible by dp_replicate x tp x pp x cp "
                    f"= {rest}; change the degrees or the number of processes"
                )
            self.dp_shard = world_size // rest
        return self

    def validate(
        self, world_size: int, model: LlamaConfig, *, seq_len: int | None = None
    ) -> ParallelConfig:
        """Check the layout against the world and the model; raises ValueError naming the fix."""
        self.resolve(world_size)
        if self.dp_shard < 1:
            raise ValueError(f"parallel.dp_shard={self.dp_shard} must be >= 1 or -1 (infer)")
        if self.pp != 1 or self.cp != 1:
            raise ValueError(
                "parallel.pp and parallel.cp are reserved axes and must be 1 in this version"
            )
        product = self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp
        if product != world_size:
            raise ValueError(
                f"dp_replicate({self.dp_replicate}) x dp_shard({self.dp_shard}) x tp({self.tp})"
                f" = {product} does not equal the world size {world_size}; set dp_shard=-1 to "
                "infer it, or launch that many processes"
            )
        tp = self.tp
        checks = [
            ("model.n_heads", model.n_heads),
            ("model.n_kv_heads", model.num_kv_heads),
            ("the FFN hidden size", model.hidden_dim),
            # The embedding is sharded on the vocabulary whatever the head.
            ("model.vocab_size", model.vocab_size),
        ]
        if model.is_lm_head:
            # Only an LM head is column-sharded; other heads (a reward model's scalar output)
            # are replicated by apply_tp, so tp need not divide their width.
            checks.append(("the output projection width", model.output_width))
        for what, value in checks:
            if value % tp:
                raise ValueError(
                    f"parallel.tp={tp} does not divide {what}={value}; choose a tp that divides "
                    "it (each rank must hold whole heads and equal shards)"
                )
        if seq_len is not None and tp > 1 and self.sequence_parallel and seq_len % tp:
            raise ValueError(
                f"sequence parallel needs seq_len={seq_len} divisible by parallel.tp={tp}; "
                "change seq_len or set parallel.sequence_parallel=false"
            )
        if self.reshard_after_forward not in RESHARD_POLICIES:
            raise ValueError(
                f"parallel.reshard_after_forward={self.reshard_after_forward!r} must be one of "
                f"{RESHARD_POLICIES}"
            )
        if self.grad_sync not in GRAD_SYNC_POLICIES:
            raise ValueError(
                f"parallel.grad_sync={self.grad_sync!r} must be one of {GRAD_SYNC_POLICIES}"
            )
        if self.memory_check not in MEMORY_CHECKS:
            raise ValueError(
                f"parallel.memory_check={self.memory_check!r} must be one of {MEMORY_CHECKS}"
            )
        if self.gpu is not None and self.gpu not in GPUS:
            raise ValueError(
                f"parallel.gpu={self.gpu!r} is not in the planner's table; use one of "
                f"{sorted(GPUS)}, or leave it unset"
            )
        if self.forward_prefetch < 0 or self.backward_prefetch < 0:
            raise ValueError("parallel.forward_prefetch/backward_prefetch must be >= 0")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"parallel.{name}={getattr(self, name)!r} must be in {DTYPES}")
        self.ac.validate()
        if self.ac.mode == "full" and self.ac.every > model.n_layers:
            raise ValueError(
                f"parallel.ac.every={self.ac.every} exceeds model.n_layers={model.n_layers}"
            )
        return self
