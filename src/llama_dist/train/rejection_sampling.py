"""Rejection-sampling fine-tuning, one iteration per call (llama2.md, "Rejection sampling").

For each prompt the policy samples K responses per temperature; the scorer ranks them together
with the responses kept for the same prompt by the earlier iterations of this run (rescored,
so every candidate is judged by the same scorer; the paper found that keeping only the previous
iteration's samples regressed), and the best is kept. The kept set is written as SFT data with
its provenance and the policy is fine-tuned on it with the SFT loop.

Sampling is distributed: the prompts are split over the data-parallel ranks, the policy is
consolidated once for generation (`generation_dist`), sharded reward models score every rank's
candidates. Each rank appends one line per finished prompt to its own file under
`iter-N/samples/`, so a crashed iteration resumes without sampling those prompts again.

    iter-N/samples/dp-*.jsonl  every candidate of every prompt with its reward
    iter-N/kept.jsonl          the best per prompt: {"messages", "reward", "iteration",
                               "sample_index", "temperature", "prompt_key"}
    iter-N/report.md, best_of_k.png, summary.json, and sft/ (the fine-tuning run)
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llama_dist.checkpoint.init import load_initial_weights, source_config
from llama_dist.config import (
    RejectionSamplingJobConfig,
    ScorerConfig,
    SFTJobConfig,
    check_collective_timeout,
)
from llama_dist.data.chat import encode_dialog
from llama_dist.data.prompts import Prompt, read_prompts
from llama_dist.generation_dist import consolidated_for_generation, generate_distributed
from llama_dist.models.config import LlamaConfig
from llama_dist.parallel import ParallelConfig, build_llama, build_mesh, dp_rank_and_size
from llama_dist.rlhf.rewards import best_of_k_curve
from llama_dist.rlhf.scoring import (
    RewardModelScorer,
    SafetyGatedScorer,
    Scorer,
    WordShareScorer,
)
from llama_dist.tokenizer import Tokenizer
from llama_dist.train.common import open_run
from llama_dist.train.pretrain import check_tokenizer
from llama_dist.train.sft import sft, validate_sft
from llama_dist.train.step import TrainState

log = logging.getLogger("llama_dist.train.rejection_sampling")

KEPT_FILE = "kept.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class RejectionSamplingResult:
    """What an iteration produced: the kept set, and the fine-tuning's counters (None without
    fine-tuning). `stopped` and `planned_steps` are the fine-tuning's, so a fine-tuning stopped
    by a signal exits 3 through `train.common.run_job`, like the other loops."""

    kept: Path
    finetune: TrainState | None = None

    @property
    def step(self) -> int | None:
        return None if self.finetune is None else self.finetune.step

    @property
    def stopped(self) -> str | None:
        return None if self.finetune is None else self.finetune.stopped

    @property
    def planned_steps(self) -> int | None:
        return None if self.finetune is None else self.finetune.planned_steps


def iteration_dir(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / f"iter-{iteration}"


def validate_rejection_sampling(cfg: RejectionSamplingJobConfig, world_size: int) -> LlamaConfig:
    """Check the job from config files alone; returns the policy's model config."""
    if not cfg.policy:
        raise ValueError("policy is not set; point it at an SFT (or earlier iteration) checkpoint")
    if not cfg.tokenizer:
        raise ValueError("tokenizer is not set; pass the policy's tokenizer.model")
    if not cfg.prompts:
        raise ValueError("prompts is empty; set prompts=[FILE.jsonl, ...]")
    if cfg.iteration < 1:
        raise ValueError(f"iteration={cfg.iteration} must be >= 1")
    model = source_config(cfg.policy)
    if not model.is_lm_head:
        raise ValueError(f"policy {cfg.policy} is a reward model; sample from a language model")
    cfg.sampling.validate()
    check_collective_timeout(cfg.collective_timeout_s, "collective_timeout_s")
    cfg.scorer.validate()
    for name in ("reward_model", "helpfulness_rm", "safety_rm"):
        path = getattr(cfg.scorer, name)
        if path and cfg.scorer.kind != "word_share" and source_config(path).output_dim != 1:
            raise ValueError(f"scorer.{name}={path} is not a reward model (scalar head)")
    for path in cfg.pool:
        if not Path(path).is_file():
            raise ValueError(f"pool file {path} does not exist")
    cfg.parallel.validate(world_size, model)
    if cfg.finetune:
        # The fine-tuning run's settings, checked now rather than after sampling.
        check = copy.deepcopy(fine_tune_config(cfg, Path(cfg.prompts[0])))
        validate_sft(check, world_size)
    return model


def fine_tune_config(cfg: Any, kept: Path) -> SFTJobConfig:
    """The SFT job that fine-tunes `cfg.policy` on the `kept` set: `cfg.sft` with the policy,
    tokenizer, layout and device of the stage `cfg` (any job config with these fields, e.g.
    rejection sampling's or context distillation's). Files in `cfg.sft.data.paths` are
    trained on beside the kept set (e.g. the SFT data, so a narrow kept set does not make the
    model forget the rest, as the paper mixes GAtt data into its RLHF data)."""
    job = copy.deepcopy(cfg.sft)
    job.init_from, job.tokenizer = cfg.policy, cfg.tokenizer
    job.data.paths = [str(kept), *job.data.paths]
    job.parallel = copy.deepcopy(cfg.parallel)
    job.train.device = cfg.device
    return job


def build_scorer(
    s: ScorerConfig,
    tokenizer: Tokenizer,
    *,
    parallel: ParallelConfig,
    mesh: Any,
    device: torch.device,
) -> Scorer:
    if s.kind == "word_share":
        return WordShareScorer(s.words)

    def reward_model(path: str) -> RewardModelScorer:
        return reward_model_scorer(
            path,
            tokenizer,
            micro_batch=s.micro_batch,
            max_len=s.max_len,
            parallel=parallel,
            mesh=mesh,
            device=device,
        )

    if s.kind == "reward_model":
        return reward_model(s.reward_model)
    return SafetyGatedScorer(
        reward_model(s.helpfulness_rm), reward_model(s.safety_rm), threshold=s.threshold
    )


def reward_model_scorer(
    path: str,
    tokenizer: Tokenizer,
    *,
    micro_batch: int,
    max_len: int,
    parallel: ParallelConfig,
    mesh: Any,
    device: torch.device,
) -> RewardModelScorer:
    """The reward model at `path`, sharded like the policy and frozen, as a scorer."""
    cfg = source_config(path)
    model = build_llama(cfg, parallel, mesh, device=device)
    load_initial_weights(model, path)
    model.requires_grad_(False)
    pad = parallel.tp if parallel.sequence_parallel else 1
    return RewardModelScorer(
        model,
        tokenizer,
        device=device,
        micro_batch=micro_batch,
        max_len=min(max_len, cfg.max_seq_len),
        pad_to_multiple_of=pad,
    )


def read_lines(folder: Path) -> list[dict]:
    """The finished prompts' records of every rank's file (a line torn by a crash is left
    out: its prompt is sampled again)."""
    out = []
    for path in sorted(folder.glob("dp-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: a line cut short by an interrupted run is ignored", path)
    return out


def load_pool(run_dir: Path, iteration: int, extra: list[str]) -> dict[str, list[dict]]:
    """prompt key -> the responses kept for it by iterations 1..iteration-1 and `extra`."""
    files = [iteration_dir(run_dir, i) / KEPT_FILE for i in range(1, iteration)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(
            f"iteration {iteration} pools with the kept sets of the earlier ones, but "
            f"{missing} do not exist; run those iterations first (or start at iteration=1)"
        )
    pool: dict[str, list[dict]] = {}
    for path in [*files, *map(Path, extra)]:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            pool.setdefault(record["prompt_key"], []).append(
                {
                    "response": record["messages"][-1]["content"],
                    "iteration": record["iteration"],
                    "sample_index": record["sample_index"],
                    "temperature": record["temperature"],
                }
            )
    return pool


def open_for_append(path: Path):
    """This rank's samples file, opened to append whole lines: the tail of a line an
    interrupted run left unfinished is cut first (its prompt is sampled again)."""
    if path.is_file():
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("%s: cutting a line left unfinished by an interrupted run", path)
            with open(path, "r+b") as f:
                f.truncate(end)
    return open(path, "a", encoding="utf-8")


def response_text(tokenizer: Tokenizer, tokens: list[int]) -> str:
    if tokenizer.eos_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_id)]
    return tokenizer.decode(tokens).strip()


def sample_prompts(
    cfg: RejectionSamplingJobConfig,
    prompts: list[Prompt],
    pool: dict[str, list[dict]],
    model_cfg: LlamaConfig,
    tokenizer: Tokenizer,
    *,
    samples_dir: Path,
    device: torch.device,
) -> int:
    """Sample and score the prompts not finished yet, appending one line per prompt to this
    rank's file; returns how many prompts this call sampled (over all ranks)."""
    s = cfg.sampling
    mesh = build_mesh(cfg.parallel, device=device.type)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    done = [{r["prompt_key"] for r in read_lines(samples_dir)} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(done, src=0)
    todo = [p for p in prompts if p.key not in done[0]]
    mine = todo[dp_rank::dp_size]
    batches = torch.tensor(-(-len(mine) // s.prompts_per_batch), device=device)
    dist.all_reduce(batches, op=dist.ReduceOp.MAX)
    log.info("%d of %d prompts to sample (%d done)", len(todo), len(prompts), len(done[0]))

    policy = build_llama(model_cfg, cfg.parallel, mesh, device=device)
    load_initial_weights(policy, cfg.policy)
    policy.requires_grad_(False)
    scorer = build_scorer(cfg.scorer, tokenizer, parallel=cfg.parallel, mesh=mesh, device=device)
    writes = mesh["tp"].get_local_rank() == 0
    out = open_for_append(samples_dir / f"dp-{dp_rank:05d}.jsonl") if writes else None
    try:
        with consolidated_for_generation(policy, mesh) as gen_model:
            for b in range(int(batches.item())):
                batch = mine[b * s.prompts_per_batch : (b + 1) * s.prompts_per_batch]
                encoded = [encode_dialog(tokenizer, p.dialog).ids for p in batch]
                candidates: list[list[dict]] = [[] for _ in batch]
                for t, temperature in enumerate(s.temperatures):
                    # Seeded by the batch's first prompt: reruns draw the same samples.
                    first = int(batch[0].key, 16) if batch else 0
                    seed = (first ^ (s.seed * 1_000_003 + cfg.iteration * 1009 + t)) % 2**62
                    rows = [ids for ids in encoded for _ in range(s.num_samples)]
                    generated = generate_distributed(
                        gen_model,
                        rows,
                        mesh=mesh,
                        max_new_tokens=s.max_new_tokens,
                        temperature=temperature,
                        top_p=s.top_p,
                        top_k=s.top_k,
                        eos_id=tokenizer.eos_id,
                        generator=torch.Generator(device).manual_seed(seed),
                    )
                    for i, tokens in enumerate(generated):
                        candidates[i // s.num_samples].append(
                            {
                                "response": response_text(tokenizer, tokens),
                                "iteration": cfg.iteration,
                                "sample_index": i % s.num_samples,
                                "temperature": temperature,
                            }
                        )
                for p, c in zip(batch, candidates, strict=True):
                    c += [dict(old, pooled=True) for old in pool.get(p.key, [])]
                flat = [(p, c) for p, cs in zip(batch, candidates, strict=True) for c in cs]
                rewards = scorer.score([p for p, _ in flat], [c["response"] for _, c in flat])
                for (_, c), r in zip(flat, rewards.tolist(), strict=True):
                    c["reward"] = r
                if out is not None:
                    for p, c in zip(batch, candidates, strict=True):
                        line = {"prompt_key": p.key, "dialog": p.dialog, "candidates": c}
                        out.write(json.dumps(line, ensure_ascii=False) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    del policy, scorer
    gc.collect()
    return len(todo)


def keep_best(
    lines: list[dict], prompts: list[Prompt], iteration: int
) -> tuple[list[dict], dict[str, Any]]:
    """The kept record of each prompt (its highest-reward non-empty candidate) and the
    iteration's statistics."""
    by_key = {}
    for line in lines:
        by_key.setdefault(line["prompt_key"], line)
    kept, new_rewards, best_new, from_pool, no_answer = [], {}, [], 0, 0
    for p in prompts:
        line = by_key[p.key]
        fresh = [c for c in line["candidates"] if not c.get("pooled")]
        for c in fresh:
            new_rewards.setdefault(c["temperature"], []).append(c["reward"])
        best_new.append(max(c["reward"] for c in fresh))
        usable = [c for c in line["candidates"] if c["response"]]
        if not usable:
            no_answer += 1
            continue
        best = max(usable, key=lambda c: c["reward"])
        from_pool += bool(best.get("pooled"))
        kept.append(
            {
                "messages": [*line["dialog"], {"role": "assistant", "content": best["response"]}],
                "reward": best["reward"],
                "iteration": best["iteration"],
                "sample_index": best["sample_index"],
                "temperature": best["temperature"],
                "prompt_key": p.key,
                "kept_in_iteration": iteration,
            }
        )
    stats = {
        "iteration": iteration,
        "prompts": len(prompts),
        "kept": len(kept),
        "kept_from_earlier_iterations": from_pool,
        "prompts_without_a_usable_answer": no_answer,
        "mean_sample_reward": _mean([r for rs in new_rewards.values() for r in rs]),
        "mean_max_sample_reward": _mean(best_new),
        "max_sample_reward": max(best_new),
        "mean_kept_reward": _mean([k["reward"] for k in kept]),
    }
    return kept, stats


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def curves(lines: list[dict], temperatures: list[float], num_samples: int) -> dict:
    """temperature -> the best-of-k curves over this iteration's fresh samples."""
    out = {}
    for t in temperatures:
        rows = []
        for line in lines:
            scores = [
                c["reward"]
                for c in line["candidates"]
                if not c.get("pooled") and c["temperature"] == t
            ]
            if len(scores) == num_samples:
                rows.append(scores)
        out[t] = best_of_k_curve(torch.tensor(rows))
    return out


def write_report(folder: Path, stats: dict, curve: dict, num_samples: int) -> str:
    lines = [f"# Rejection sampling, iteration {stats['iteration']}", ""]
    lines += [
        f"- {k.replace('_', ' ')}: {v:.4f}"
        if isinstance(v, float)
        else f"- {k.replace('_', ' ')}: {v}"
        for k, v in stats.items()
        if k != "iteration"
    ]
    lines += [
        "",
        "Expected reward of the best (max) and the median of k samples, mean over prompts:",
        "",
    ]
    header = "| k | " + " | ".join(f"max (T={t}) | median (T={t})" for t in curve) + " |"
    lines += [header, "|---:|" + "---:|---:|" * len(curve)]
    for k in range(num_samples):
        cells = " | ".join(f"{c['max'][k]:.4f} | {c['median'][k]:.4f}" for c in curve.values())
        lines.append(f"| {k + 1} | {cells} |")
    text = "\n".join(lines) + "\n"
    (folder / "report.md").write_text(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = list(range(1, num_samples + 1))
    for t, c in curve.items():
        (line,) = ax.plot(ks, c["max"], marker="o", label=f"max, T={t}")
        ax.plot(ks, c["median"], linestyle="--", color=line.get_color(), label=f"median, T={t}")
    ax.set_xlabel("number of samples k")
    ax.set_ylabel("reward")
    ax.set_title(f"Rejection sampling, iteration {stats['iteration']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "best_of_k.png", dpi=120)
    plt.close(fig)
    return text


def rejection_sampling(cfg: RejectionSamplingJobConfig, run_dir: Path) -> RejectionSamplingResult:
    """Run (or resume) one iteration into `run_dir/iter-N`; every rank calls this."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_cfg = validate_rejection_sampling(cfg, world_size)
    tokenizer = check_tokenizer(cfg.tokenizer, model_cfg.vocab_size)
    assert tokenizer is not None
    prompts = read_prompts(cfg.prompts, skip_invalid=cfg.skip_invalid)
    run_dir = Path(run_dir)
    folder = iteration_dir(run_dir, cfg.iteration)
    pool = load_pool(run_dir, cfg.iteration, cfg.pool)
    kept_file = folder / KEPT_FILE
    device = open_run(folder, cfg, device=cfg.device, collective_timeout_s=cfg.collective_timeout_s)
    samples_dir = folder / "samples"
    if dist.get_rank() == 0:
        samples_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    if not (folder / SUMMARY_FILE).is_file():
        sample_prompts(
            cfg, prompts, pool, model_cfg, tokenizer, samples_dir=samples_dir, device=device
        )
        dist.barrier()
        if dist.get_rank() == 0:
            lines = read_lines(samples_dir)
            kept, stats = keep_best(lines, prompts, cfg.iteration)
            curve = curves(lines, cfg.sampling.temperatures, cfg.sampling.num_samples)
            tmp = kept_file.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept))
            tmp.replace(kept_file)
            print(write_report(folder, stats, curve, cfg.sampling.num_samples), flush=True)
            summary = {**stats, "curves": {str(t): c for t, c in curve.items()}}
            (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        dist.barrier()
    else:
        log.info("iteration %d already sampled (%s)", cfg.iteration, kept_file)

    if not cfg.finetune:
        return RejectionSamplingResult(kept_file)
    return RejectionSamplingResult(kept_file, sft(fine_tune_config(cfg, kept_file), folder / "sft"))


__all__ = [
    "RejectionSamplingResult",
    "best_of_k_curve",
    "keep_best",
    "load_pool",
    "rejection_sampling",
    "validate_rejection_sampling",
]
