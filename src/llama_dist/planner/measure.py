"""Measured activation memory, to hold the planner's formulas to: the bytes alive after the
forward pass (what backward will use), from MemTracker, on CPU or any device."""

from __future__ import annotations

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from llama_dist.losses import cross_entropy_loss
from llama_dist.models import Llama, LlamaConfig
from llama_dist.parallel import ACConfig, ParallelConfig, loss_context
from llama_dist.parallel.ac import apply_ac
from llama_dist.planner.memory import head_activation_terms, layer_activation_bytes


def activation_bytes(tracker: MemTracker, which: str) -> int:
    """The Activation category of a MemTracker snapshot ("current" or "peak")."""
    snapshot = tracker.get_tracker_snapshot(which)
    device = next(iter(snapshot))
    return next(v for k, v in snapshot[device].items() if getattr(k, "value", "") == "Activation")


def formula_kept(
    cfg: LlamaConfig, *, batch: int, seq: int, p: int, ac: str, tp: int = 1, sp: bool = True
) -> float:
    """The planner's bytes kept for backward by one micro-batch (all layers and the head)."""
    per_layer = layer_activation_bytes(cfg, p=p, tp=tp, sp=sp, ac=ac)
    head = sum(head_activation_terms(cfg, p=p, tp=tp, sp=sp).values())
    return batch * seq * (cfg.n_layers * per_layer + head)


def _forward_backward(model, tokens, tracker: MemTracker, pc: ParallelConfig | None = None):
    with tracker:
        with loss_context(pc or ParallelConfig()):
            loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
            kept = activation_bytes(tracker, "current")
            loss.backward()
    return kept, activation_bytes(tracker, "peak")


def measure_single(
    cfg: LlamaConfig, *, dtype: torch.dtype, ac: str, batch: int, seq: int, seed: int = 0
) -> tuple[int, int]:
    """(bytes kept after forward, peak activation bytes over forward + backward), one process."""
    torch.manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    model = Llama(cfg)
    model.init_weights(seed)
    model.to(dtype)
    apply_ac(model, ACConfig(mode=ac))
    tracker = MemTracker()
    tracker.track_external(model)
    return _forward_backward(model, tokens, tracker)


def measure_parallel(
    cfg: LlamaConfig, pc: ParallelConfig, *, batch: int, seq: int, seed: int = 0
) -> tuple[int, torch.nn.Module]:
    """Bytes kept after forward on this rank of a parallelized fp32 model (call on every rank
    of an initialised process group); returns them with the model, whose gradients are set."""
    from llama_dist.parallel.mesh import build_mesh
    from llama_dist.parallel.parallelize import init_weights_parallel, parallelize_llama

    pc.validate(torch.distributed.get_world_size(), cfg, seq_len=seq)
    mesh = build_mesh(pc, device="cpu")
    with torch.device("meta"):
        model = Llama(cfg)
    parallelize_llama(model, mesh, pc)
    model.to_empty(device="cpu")
    init_weights_parallel(model, seed)
    torch.manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    tracker = MemTracker()
    tracker.track_external(model)
    kept, _ = _forward_backward(model, tokens, tracker, pc)
    return kept, model
