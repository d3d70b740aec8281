"""A prompt set answered on the data-parallel ranks in fixed batches, resumable line by line.

The stages that answer prompts and score the answers (safety context distillation, the safety
evaluation) share this. The prompts are cut, in their order, into fixed batches of
`prompts_per_batch`; each batch is generated in one call seeded by its first prompt's key, so
a prompt's answer is the same whatever the number of ranks (only the ranks that take the
batches change). The batches not finished yet are dealt round-robin to the data-parallel
ranks; each rank appends one line per prompt of a finished batch to its own file
`dp-*.jsonl` in the folder, so a crashed run resumes without generating those again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from llama_dist.config import PromptGenerationConfig
from llama_dist.data.chat import encode_dialog
from llama_dist.data.prompts import Prompt
from llama_dist.generation_dist import generate_distributed
from llama_dist.models.llama import Llama
from llama_dist.parallel import dp_rank_and_size
from llama_dist.rlhf.scoring import Scorer
from llama_dist.tokenizer import Tokenizer
from llama_dist.train.rejection_sampling import open_for_append, read_lines, response_text

log = logging.getLogger("llama_dist.train.answers")


def fixed_batches(prompts: Sequence[Prompt], size: int) -> list[list[Prompt]]:
    return [list(prompts[i : i + size]) for i in range(0, len(prompts), size)]


def batch_seed(batch: Sequence[Prompt], seed: int) -> int:
    """The generator seed of a batch: its first prompt's key with the configured seed."""
    first = int(batch[0].key, 16) if batch else 0
    return (first ^ (seed * 1_000_003)) % 2**62


def read_records(folder: Path) -> dict[str, dict]:
    """prompt key -> its line, over every rank's file of `folder` (a batch redone after a
    crash may have written a prompt twice, with the same content: the first is kept)."""
    out: dict[str, dict] = {}
    if folder.is_dir():
        for line in read_lines(folder):
            out.setdefault(line["prompt_key"], line)
    return out


def run_batches(
    prompts: Sequence[Prompt],
    work: Callable[[list[Prompt]], list[dict]],
    *,
    prompts_per_batch: int,
    folder: Path,
    mesh: DeviceMesh,
) -> int:
    """Call `work(batch)` for this rank's unfinished batches and append the records it returns
    (one per prompt, with its "prompt_key") to this rank's file; returns how many batches ran
    over all ranks. Every rank calls with the same prompts, and every rank calls `work` the
    same number of times (with an empty batch when it has none left), since `work` may run
    collective forwards."""
    dp_rank, dp_size = dp_rank_and_size(mesh)
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    done = [set(read_records(folder)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(done, src=0)
    todo = [
        b for b in fixed_batches(prompts, prompts_per_batch) if any(p.key not in done[0] for p in b)
    ]
    mine = todo[dp_rank::dp_size]
    rounds = torch.tensor(len(mine))
    if dist.get_world_size() > 1:
        rounds = rounds.to(mesh.device_type)
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    log.info(
        "%s: %d of %d batches to answer", folder, len(todo), -(-len(prompts) // prompts_per_batch)
    )
    writes = mesh["tp"].get_local_rank() == 0
    out = open_for_append(folder / f"dp-{dp_rank:05d}.jsonl") if writes else None
    try:
        for r in range(int(rounds.item())):
            batch = mine[r] if r < len(mine) else []
            records = work(batch)
            assert len(records) == len(batch), (len(records), len(batch))
            if out is not None and records:
                out.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records))
                out.flush()
                os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    dist.barrier()
    return len(todo)


def generate_answers(
    gen_model: Llama,
    dialogs: Sequence[Sequence[Mapping[str, str]]],
    *,
    tokenizer: Tokenizer,
    mesh: DeviceMesh,
    sampling: PromptGenerationConfig,
    seed: int,
) -> list[str]:
    """The model's answer text to each dialog (this rank's, possibly none), from one
    `generate_distributed` call seeded by `seed`."""
    rows = [encode_dialog(tokenizer, d).ids for d in dialogs]
    device = gen_model.tok_embeddings.weight.device
    generated = generate_distributed(
        gen_model,
        rows,
        mesh=mesh,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        eos_id=tokenizer.eos_id,
        generator=torch.Generator(device).manual_seed(seed),
    )
    return [response_text(tokenizer, tokens) for tokens in generated]


def answer_work(
    gen_model: Llama,
    scorers: Mapping[str, Scorer],
    *,
    tokenizer: Tokenizer,
    mesh: DeviceMesh,
    sampling: PromptGenerationConfig,
    extra: Mapping[str, Any] | None = None,
) -> Callable[[list[Prompt]], list[dict]]:
    """The `run_batches` work of answering prompts as they are: each record holds the prompt,
    the answer and one score per scorer (by its name, e.g. "safety", "helpfulness")."""

    def work(batch: list[Prompt]) -> list[dict]:
        responses = generate_answers(
            gen_model,
            [p.dialog for p in batch],
            tokenizer=tokenizer,
            mesh=mesh,
            sampling=sampling,
            seed=batch_seed(batch, sampling.seed),
        )
        scores = {name: s.score(batch, responses).tolist() for name, s in scorers.items()}
        return [
            {
                "prompt_key": p.key,
                "dialog": p.dialog,
                "safety_tagged": p.safety_tagged,
                "risk_category": p.risk_category,
                "response": response,
                **{name: scores[name][i] for name in scorers},
                **(extra or {}),
            }
            for i, (p, response) in enumerate(zip(batch, responses, strict=True))
        ]

    return work


__all__ = [
    "answer_work",
    "batch_seed",
    "fixed_batches",
    "generate_answers",
    "read_records",
    "run_batches",
]
