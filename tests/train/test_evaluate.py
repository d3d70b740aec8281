"""Validation loss (`train.step.evaluate`): the token mean over labelled tokens of real rows,
summed in the head, equal on every layout to the logits computed in one process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama_dist.losses import IGNORE_INDEX
from llama_dist.models import LlamaConfig
from llama_dist.parallel import ParallelConfig, build_llama, build_mesh, dp_rank_and_size
from llama_dist.testing.distributed import run_distributed
from llama_dist.train.step import evaluate

MODEL = LlamaConfig(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=64, max_seq_len=32
)
SEQ = 12
CPU = torch.device("cpu")


def batches() -> list[dict[str, torch.Tensor]]:
    """Two global batches of 4 rows: labels masked unevenly, and the last row of the second
    batch a filler (sample_mask False) whose tokens must not count."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for b in range(2):
        tokens = torch.randint(0, MODEL.vocab_size, (4, SEQ), generator=gen)
        labels = torch.randint(0, MODEL.vocab_size, (4, SEQ), generator=gen)
        labels[0, :9] = IGNORE_INDEX
        labels[2, ::2] = IGNORE_INDEX
        mask = torch.tensor([True, True, True, b == 0])
        out.append({"tokens": tokens, "labels": labels, "sample_mask": mask})
    return out


def reference_loss() -> float:
    model = build_llama(MODEL, ParallelConfig(dp_shard=1), None, device=torch.device("cpu"))
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches():
            labels = batch["labels"].clone()
            labels[~batch["sample_mask"]] = IGNORE_INDEX
            logits = model(batch["tokens"])
            total += F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((labels != IGNORE_INDEX).sum())
    return total / count


def evaluate_on(parallel: ParallelConfig | None) -> float:
    if parallel is None:
        parallel, mesh, (rank, size) = ParallelConfig(dp_shard=1), None, (0, 1)
    else:
        parallel.validate(dist.get_world_size(), MODEL, seq_len=SEQ)
        mesh = build_mesh(parallel, device="cpu")
        rank, size = dp_rank_and_size(mesh)
    model = build_llama(MODEL, parallel, mesh, device=torch.device("cpu"))
    local = [{k: v.chunk(size)[rank] for k, v in b.items()} for b in batches()]
    return evaluate(model, local, parallel=parallel, device=torch.device("cpu"))["loss"]


def test_one_process_is_the_token_mean_of_real_rows():
    loss = evaluate_on(None)
    assert loss == pytest.approx(reference_loss(), abs=1e-6)
    # The filler row matters: counting it would move the mean.
    gen_all = batches()
    for b in gen_all:
        b["sample_mask"][:] = True
    model = build_llama(MODEL, ParallelConfig(dp_shard=1), None, device=torch.device("cpu"))
    with_filler = evaluate(model, gen_all, parallel=ParallelConfig(dp_shard=1), device=CPU)
    assert abs(with_filler["loss"] - loss) > 1e-3
    assert with_filler["perplexity"] == pytest.approx(math.exp(with_filler["loss"]))


@pytest.mark.parametrize("layout", ["fsdp2", "tp2"])
def test_two_ranks_equal_one_process(layout):
    parallel = {"fsdp2": ParallelConfig(), "tp2": ParallelConfig(tp=2)}[layout]
    loss = run_distributed(evaluate_on, 2, parallel)
    assert loss == pytest.approx(reference_loss(), abs=1e-6)
