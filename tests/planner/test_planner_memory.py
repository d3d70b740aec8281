"""The planner's memory model against memory measured on CPU.

Activations kept for backward (the quantity of Korthikanti et al.'s formulas) are measured with
MemTracker after the forward pass, for every recomputation policy, fp32 and bf16, MHA and GQA,
and under tensor parallelism with and without sequence parallelism. Sharded parameters and
optimizer state are counted on a real FSDP / TP model after an optimizer step; the local
parameter count of big layouts is checked against the meta-device dry run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from llama_dist.models import LlamaConfig, get_preset
from llama_dist.parallel import ACConfig, ParallelConfig
from llama_dist.planner.measure import formula_kept, measure_parallel, measure_single
from llama_dist.planner.memory import (
    Layout,
    estimate_memory,
    layer_activation_bytes,
    local_param_count,
)
from llama_dist.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ("none", "selective", "full")
BATCH, SEQ = 2, 128
# The formulas count every kept tensor; what differs is a few bytes of scalars.
TOLERANCE = 0.02


def formula(cfg: LlamaConfig, **kw) -> float:
    return formula_kept(cfg, batch=BATCH, seq=SEQ, **kw)


SHAPES = {
    "gqa": LlamaConfig(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=256
    ),
    "mha": LlamaConfig(
        dim=256, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=512, max_seq_len=256
    ),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kept_activations_match_formula_per_policy(shape, dtype):
    cfg = SHAPES[shape]
    p = dtype.itemsize
    for ac in POLICIES:
        kept, peak = measure_single(cfg, dtype=dtype, ac=ac, batch=BATCH, seq=SEQ)
        expected = formula(cfg, p=p, ac=ac)
        assert kept == pytest.approx(expected, rel=TOLERANCE), (ac, kept, expected)
        # The planner's peak (kept + one recomputed layer or the logits) bounds the measured one.
        est = estimate_memory(
            cfg, Layout(micro_batch=BATCH, ac=ac), seq_len=SEQ, grad_accum=1, act_bytes=p
        )
        assert 0.5 * est.activations <= peak <= est.activations * 1.01, (ac, peak, est.activations)


def test_per_layer_formulas_in_closed_form():
    """The closed forms quoted in the README (bf16, no TP)."""
    cfg = get_preset("7b")
    none, sel, full = (layer_activation_bytes(cfg, p=2, ac=ac) for ac in POLICIES)
    h, f, a, kd = cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.num_kv_heads * cfg.head_dim
    assert full == 2 * h  # the block input only, as the paper's 2 s b h
    assert none == 24 * h + 8 * f + 4 * a + 8  # the README's figures
    assert sel == 10 * h + 4 * kd + 4 * f + 4 * a
    assert full < sel < none


def _tp_worker() -> list[tuple]:
    cfg = SHAPES["gqa"]
    out = []
    layouts = [(2, sp, ac) for sp in (True, False) for ac in POLICIES] + [(1, True, "none")]
    for tp, sp, ac in layouts:
        pc = ParallelConfig(tp=tp, sequence_parallel=sp, ac=ACConfig(mode=ac))
        kept, model = measure_parallel(cfg, pc, batch=BATCH, seq=SEQ)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        optimizer.step()

        def local(t):
            return t.to_local() if isinstance(t, DTensor) else t

        param_bytes = sum(local(q).numel() * 4 for q in model.parameters())
        state_bytes = sum(
            local(v).numel() * 4
            for s in optimizer.state.values()
            for k, v in s.items()
            if k in ("exp_avg", "exp_avg_sq")
        )
        out.append((tp, sp, ac, kept, param_bytes, state_bytes))
    return out


def test_tensor_parallel_and_fsdp_memory_match_formulas():
    cfg = SHAPES["gqa"]
    for tp, sp, ac, kept, param_bytes, state_bytes in run_distributed(_tp_worker, 2):
        expected = formula(cfg, p=4, tp=tp, sp=sp, ac=ac)
        assert kept == pytest.approx(expected, rel=TOLERANCE), (tp, sp, ac, kept, expected)
        layout = Layout(tp=tp, dp_shard=2 // tp, micro_batch=BATCH, ac=ac, sequence_parallel=sp)
        est = estimate_memory(cfg, layout, seq_len=SEQ, grad_accum=1, act_bytes=4, param_bytes=4)
        # Shards are uneven by at most a row per tensor.
        assert param_bytes == pytest.approx(est.params, rel=0.01), (tp, param_bytes, est.params)
        assert state_bytes == pytest.approx(est.optimizer, rel=0.01), (tp, state_bytes)


@pytest.mark.parametrize("preset, world, tp", [("70b", 2048, 8), ("7b", 64, 1)])
def test_local_params_match_dry_run(preset, world, tp):
    """The meta-device dry run applies the real parallelize code at full scale."""
    out = subprocess.run(
        [
            sys.executable,
            "launch/dry_run.py",
            "--model",
            preset,
            "--world-size",
            str(world),
            "--tp",
            str(tp),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("parameters (local)"))
    measured = int(re.search(r"([\d,]{5,})", line).group(1).replace(",", ""))
    planned = local_param_count(get_preset(preset), tp, world // tp)
    # Rank 0 holds the largest shard: FSDP rounds dim 0 up.
    assert planned <= measured <= 1.03 * planned
