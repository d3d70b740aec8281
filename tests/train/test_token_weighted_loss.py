"""The shared step is token-weighted over the whole optimizer step, on every layout.

Labels are masked so that micro-batches and ranks hold very different numbers of labelled
tokens (1 to 16 per row, some rows none at all), as SFT's prompt masking produces. Each
layout, with gradient accumulation, must give the loss and gradients of one process that
sees the whole global batch in one forward: the sum over labelled tokens divided by their
count. A mean of per-micro-batch means would be off by far more than the tolerances.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_dist.losses import IGNORE_INDEX
from llama_dist.models import LlamaConfig
from llama_dist.parallel import ParallelConfig, build_llama
from llama_dist.testing.distributed import run_distributed
from llama_dist.testing.parity import train_steps

MODEL = LlamaConfig(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=64, max_seq_len=32
)
STEPS, GLOBAL_BATCH, SEQ = 2, 8, 16
TRAIN = dict(lr=1e-2, max_norm=1e9)  # no clipping: gradients are compared as computed


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, MODEL.vocab_size, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=gen)
    labels = tokens[..., 1:].clone()
    # Labelled tokens per row: rank 0's rows (the first half) keep few, rank 1's many; within
    # a rank the micro-batches differ too; one row per step has none at all.
    keep = torch.tensor([1, 0, 2, 3, 16, 12, 15, 9])
    for step in range(STEPS):
        for row, k in enumerate(keep.roll(step)):
            labels[step, row, : SEQ - int(k)] = IGNORE_INDEX  # the answer is the row's end
    return tokens, labels


LAYOUTS_2 = {"fsdp2": ParallelConfig()}
LAYOUTS_4 = {"dp2_tp2": ParallelConfig(tp=2), "hsdp2x2": ParallelConfig(dp_replicate=2)}


def run_layouts(layouts, tokens, labels):
    return {
        (name, accum): train_steps(MODEL, cfg, tokens, labels=labels, grad_accum=accum, **TRAIN)
        for name, cfg in layouts.items()
        for accum in (1, 2)
    }


@pytest.fixture(scope="module")
def reference():
    tokens, labels = data()
    return train_steps(MODEL, None, tokens, labels=labels, **TRAIN)


@pytest.fixture(scope="module")
def results():
    tokens, labels = data()
    out = run_distributed(run_layouts, 2, LAYOUTS_2, tokens, labels)
    out.update(run_distributed(run_layouts, 4, LAYOUTS_4, tokens, labels))
    return out


def test_reference_is_the_token_mean(reference):
    tokens, labels = data()
    model = build_llama(MODEL, ParallelConfig(dp_shard=1), None, device=torch.device("cpu"))
    per_token = F.cross_entropy(
        model(tokens[0, :, :-1]).flatten(0, 1),
        labels[0].flatten(),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    ).view(GLOBAL_BATCH, SEQ)
    labelled = labels[0] != IGNORE_INDEX
    expected = per_token.sum() / labelled.sum()
    assert reference["losses"][0] == pytest.approx(expected.item(), abs=1e-6)
    # The data make the distinction matter: a mean of the means of 4 micro-batches (2 ranks x
    # 2 accumulation steps) is far from the token mean.
    micro_means = [
        per_token[i : i + 2].sum() / labelled[i : i + 2].sum() for i in range(0, GLOBAL_BATCH, 2)
    ]
    assert abs(sum(micro_means).item() / 4 - expected.item()) > 1e-2


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("layout", ["fsdp2", "dp2_tp2", "hsdp2x2"])
def test_layout_matches_one_process_on_masked_labels(results, reference, layout, accum):
    result = results[layout, accum]
    torch.testing.assert_close(
        torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=0, atol=1e-6
    )
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=0, atol=1e-5, msg=name)
