"""Activation recomputation memory/recompute trade-off, per-block compile, config checks."""

from __future__ import annotations

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode

from llama_dist.losses import cross_entropy_loss
from llama_dist.models import Llama, LlamaConfig, get_preset
from llama_dist.parallel import ACConfig, ParallelConfig
from llama_dist.parallel.ac import apply_ac, resolve_ops
from llama_dist.parallel.parallelize import apply_compile

MODEL = LlamaConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=256)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def measure(ac: ACConfig) -> dict:
    torch.manual_seed(0)
    tokens = torch.randint(0, MODEL.vocab_size, (4, 257))
    model = Llama(MODEL)
    model.init_weights(0)
    apply_ac(model, ac)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
        with OpCounter() as backward_ops:
            loss.backward()
    peak = tracker.get_tracker_snapshot("peak")
    device = next(d for d in peak if d.type == "cpu")
    activation = next(v for k, v in peak[device].items() if getattr(k, "value", "") == "Activation")
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"activation": activation, "backward_ops": backward_ops.count, "grads": grads}


@pytest.fixture(scope="module")
def policies():
    return {
        "none": measure(ACConfig()),
        "full": measure(ACConfig(mode="full")),
        "every2": measure(ACConfig(mode="full", every=2)),
        "selective": measure(ACConfig(mode="selective")),
    }


def test_selective_ac_saves_memory_and_recomputes_less_than_full(policies):
    none, full, sel = policies["none"], policies["full"], policies["selective"]
    # Peak activation memory: full < selective < none.
    assert full["activation"] < sel["activation"] < 0.8 * none["activation"]
    # Work redone in backward: none < selective < full (selective keeps matmuls/attention).
    assert none["backward_ops"] < sel["backward_ops"] < full["backward_ops"]
    # Every other block recomputed: in between none and full on both counts.
    every2 = policies["every2"]
    assert full["activation"] < every2["activation"] < none["activation"]
    assert none["backward_ops"] < every2["backward_ops"] < full["backward_ops"]


def test_recomputation_does_not_change_gradients(policies):
    for name in ("full", "every2", "selective"):
        for param, grad in policies["none"]["grads"].items():
            assert torch.equal(policies[name]["grads"][param], grad), (name, param)


def test_saved_op_names_resolve_per_device():
    ops = resolve_ops(["sdpa"])
    # On CPU attention dispatches to the *_for_cpu kernel (cpu-notes.md, trap 5).
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in ops
    assert torch.ops.aten.mm.default in resolve_ops(["aten.mm.default"])
    with pytest.raises(ValueError, match="unknown op 'aten.not_an_op.default'"):
        resolve_ops(["aten.not_an_op.default"])
    with pytest.raises(ValueError, match="neither a group"):
        resolve_ops(["matmul"])


def test_per_block_compile_matches_eager():
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=2, vocab_size=97, max_seq_len=32)
    eager, compiled = Llama(cfg), Llama(cfg)
    eager.init_weights(0)
    compiled.init_weights(0)
    apply_compile(compiled)
    losses = []
    for model in (eager, compiled):
        loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    names = [n for n, _ in compiled.named_parameters()]
    assert names == [n for n, _ in eager.named_parameters()]  # no wrapper prefixes


@pytest.mark.parametrize(
    "cfg,world,match",
    [
        (ParallelConfig(dp_shard=3, tp=2), 8, r"= 6 does not equal the world size 8"),
        (ParallelConfig(tp=3), 8, r"world size 8 is not divisible by .* = 3"),
        (ParallelConfig(tp=16), 16, r"parallel.tp=16 does not divide model.n_kv_heads=8"),
        (ParallelConfig(tp=128), 128, r"parallel.tp=128 does not divide model.n_heads=64"),
        (ParallelConfig(pp=2), 16, "reserved"),
        (ParallelConfig(reshard_after_forward="sometimes"), 8, "must be one of"),
        (ParallelConfig(param_dtype="fp8"), 8, "param_dtype='fp8' must be in"),
        (ParallelConfig(ac=ACConfig(mode="some")), 8, "ac.mode='some' must be one of"),
        (ParallelConfig(ac=ACConfig(mode="full", every=0)), 8, "ac.every=0 must be >= 1"),
        (ParallelConfig(ac=ACConfig(mode="selective", saved_ops=[])), 8, "use mode=full"),
    ],
)
def test_bad_layouts_are_clear_errors(cfg, world, match):
    with pytest.raises(ValueError, match=match):
        cfg.validate(world, get_preset("70b"))


def test_sequence_parallel_needs_divisible_sequence():
    with pytest.raises(ValueError, match="seq_len=4095 divisible by parallel.tp=8"):
        ParallelConfig(tp=8).validate(8, get_preset("70b"), seq_len=4095)
    cfg = ParallelConfig(tp=8, dp_replicate=2).validate(256, get_preset("70b"), seq_len=4096)
    assert (cfg.dp_replicate, cfg.dp_shard, cfg.tp) == (2, 16, 8)
