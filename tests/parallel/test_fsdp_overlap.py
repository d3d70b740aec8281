"""FSDP communication: prefetch order and no gradient reduction on inner micro-steps."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from llama_dist.losses import cross_entropy_loss
from llama_dist.models import LlamaConfig
from llama_dist.parallel import ParallelConfig, build_llama, build_mesh, set_gradient_sync
from llama_dist.testing.distributed import run_distributed

MODEL = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32)


def _profiled_names(fn, prefixes: tuple[str, ...]) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith(prefixes)]
    return [e.name for e in sorted(events, key=lambda e: e.time_range.start)]


def _forward_order(forward_prefetch: int) -> list[str]:
    cfg = ParallelConfig(forward_prefetch=forward_prefetch, backward_prefetch=1)
    cfg.validate(2, MODEL)
    model = build_llama(MODEL, cfg, build_mesh(cfg), device=torch.device("cpu"))
    for name, block in model.layers.items():
        # Registered after FSDP's pre-forward hook, so it runs once FSDP has issued its
        # all-gathers: the mark sits where the block's own compute starts.
        def mark(_module, _args, name=name):
            with record_function(f"compute layers.{name}"):
                pass

        block.register_forward_pre_hook(mark)
    tokens = torch.randint(0, MODEL.vocab_size, (2, 16))
    model(tokens).sum().backward()  # lazy init happens on the first step
    return _profiled_names(lambda: model(tokens), ("FSDP::all_gather (", "compute "))


def _reductions_per_micro_step(use_no_sync: bool) -> list[int]:
    cfg = ParallelConfig().validate(2, MODEL)
    model = build_llama(MODEL, cfg, build_mesh(cfg), device=torch.device("cpu"))
    tokens = torch.randint(0, MODEL.vocab_size, (2, 17))
    counts = []
    for micro in range(2):
        if use_no_sync:
            set_gradient_sync(model, micro == 1)

        def step():
            cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()

        counts.append(len(_profiled_names(step, ("FSDP::post_backward_reduce",))))
    return counts


def _reductions_in_training_step(grad_sync: str) -> int:
    """FSDP reductions in one `forward_backward` call of 2 micro-batches."""
    from llama_dist.train.step import forward_backward

    cfg = ParallelConfig(grad_sync=grad_sync).validate(2, MODEL)
    model = build_llama(MODEL, cfg, build_mesh(cfg), device=torch.device("cpu"))
    batches = [{"tokens": torch.randint(0, MODEL.vocab_size, (2, 17))} for _ in range(2)]

    def step():
        forward_backward(model, batches, parallel=cfg, device=torch.device("cpu"))

    return len(_profiled_names(step, ("FSDP::post_backward_reduce",)))


def overlap_worker():
    return {
        "loop_last": _reductions_in_training_step("last"),
        "loop_every": _reductions_in_training_step("every"),
        "prefetch": _forward_order(1),
        "no_prefetch": _forward_order(0),
        "accum": _reductions_per_micro_step(True),
        "accum_control": _reductions_per_micro_step(False),
    }


def test_forward_prefetch_and_accumulation_without_reduce_scatter():
    result = run_distributed(overlap_worker, 2)
    n = MODEL.n_layers
    with_prefetch, without = result["prefetch"], result["no_prefetch"]
    for i in range(n - 1):
        gather_next = f"FSDP::all_gather (layers.{i + 1})"
        compute = f"compute layers.{i}"
        # Prefetch: block i+1's all-gather is issued before block i computes...
        assert with_prefetch.index(gather_next) < with_prefetch.index(compute), with_prefetch
        # ...and without it only when block i+1 is reached (the test can tell them apart).
        assert without.index(gather_next) > without.index(compute), without
    # One reduction per FSDP group on the last micro-step only: embedding, blocks, norm+output.
    groups = n + 2
    assert result["accum"] == [0, groups]
    assert result["accum_control"] == [groups, groups]
    # The training loop: parallel.grad_sync=last reduces once per step, every per micro-batch.
    assert result["loop_last"] == groups
    assert result["loop_every"] == 2 * groups
