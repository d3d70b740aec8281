"""FSDP mixed precision keeps the RoPE tables in fp32 (they are block inputs, which FSDP would
cast to the compute dtype by default) while the blocks compute in bf16."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from llama_dist.models import LlamaConfig
from llama_dist.parallel import ACConfig, ParallelConfig, build_llama, build_mesh
from llama_dist.testing.distributed import run_distributed

MODEL = LlamaConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_hidden_dim=96, max_seq_len=32
)
LAYOUTS = {
    "fsdp2_bf16": ParallelConfig(param_dtype="bf16", reduce_dtype="fp32"),
    "fsdp2_bf16_selective_ac": ParallelConfig(
        param_dtype="bf16", reduce_dtype="fp32", ac=ACConfig(mode="selective")
    ),
}


def block_inputs(layouts: dict[str, ParallelConfig]) -> dict[str, dict[str, str]]:
    out = {}
    tokens = torch.randint(0, MODEL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for name, parallel in layouts.items():
        parallel = copy.deepcopy(parallel)
        parallel.validate(dist.get_world_size(), MODEL, seq_len=16)
        model = build_llama(
            MODEL, parallel, build_mesh(parallel, device="cpu"), device=torch.device("cpu")
        )
        seen: dict[str, str] = {}

        def record(module, args, kwargs, seen=seen):
            x, cos, sin = args[:3]
            seen.update(x=str(x.dtype), cos=str(cos.dtype), sin=str(sin.dtype))

        model.layers["1"].attention.register_forward_pre_hook(record, with_kwargs=True)
        model(tokens).sum().backward()
        out[name] = seen
    return out


def test_rope_tables_reach_the_blocks_in_fp32_under_bf16_fsdp():
    seen = run_distributed(block_inputs, 2, LAYOUTS)
    for name, dtypes in seen.items():
        assert dtypes == {"x": "torch.bfloat16", "cos": "torch.float32", "sin": "torch.float32"}, (
            name
        )
