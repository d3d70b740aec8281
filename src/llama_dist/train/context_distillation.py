"""Safety context distillation as a stage (llama2.md, "Safety context distillation").

The policy answers each safety-tagged prompt twice, without and with a safety pre-prompt
(`rlhf.context_distillation`: adjectives and the answer template of the prompt's risk
category, as the system message or prefixed to the user message), two independent draws. The
Safety RM scores both answers on the prompt without the pre-prompt; the pre-prompted answer is
kept only when it scores higher (the paper's RM gate), and the policy is fine-tuned on the kept
set (prompt without the pre-prompt, kept answer) with the SFT loop. The prompts that are not
safety-tagged are the helpful ones: with a Helpfulness RM, the policy's and the fine-tuned
model's answers to them are scored, to show that distillation cost no helpfulness.

Generation is distributed like rejection sampling's (`train.answers`): fixed batches over the
data-parallel ranks, the policy consolidated once, sharded reward models, one JSONL line per
finished prompt, so a crashed stage resumes without generating or scoring those again.

    samples/dp-*.jsonl         per tagged prompt: its pre-prompt, the answer without and with
                               it, each with its Safety RM score
    helpful-before/dp-*.jsonl  the policy's answers to the helpful prompts (with both RMs)
    kept.jsonl                 SFT records {"messages", "prompt_key", "risk_category",
                               "preprompt", "safety_before", "safety_after"}
    sft/                       the fine-tuning run (its checkpoints are the distilled model)
    after/dp-*.jsonl           the fine-tuned model's answers to every prompt, no pre-prompt
    report.md, safety_scores.png, summary.json
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from llama_dist.checkpoint.init import load_initial_weights, source_config
from llama_dist.config import (
    ContextDistillationJobConfig,
    PrepromptConfig,
    check_collective_timeout,
)
from llama_dist.data.chat import encode_dialog
from llama_dist.data.prompts import Prompt, read_prompts
from llama_dist.generation_dist import consolidated_for_generation
from llama_dist.models.config import LlamaConfig
from llama_dist.parallel import build_llama, build_mesh
from llama_dist.rlhf.context_distillation import rm_gate, safety_preprompt, with_preprompt
from llama_dist.rlhf.scoring import RewardModelScorer
from llama_dist.tokenizer import Tokenizer
from llama_dist.train.answers import (
    answer_work,
    batch_seed,
    generate_answers,
    read_records,
    run_batches,
)
from llama_dist.train.common import open_run
from llama_dist.train.pretrain import check_tokenizer
from llama_dist.train.rejection_sampling import (
    RejectionSamplingResult,
    fine_tune_config,
    reward_model_scorer,
)
from llama_dist.train.sft import sft, validate_sft

log = logging.getLogger("llama_dist.train.context_distillation")

KEPT_FILE = "kept.jsonl"
SUMMARY_FILE = "summary.json"
SAMPLES, HELPFUL_BEFORE, AFTER = "samples", "helpful-before", "after"
# What the stage produced: the kept set and its fine-tuning, as rejection sampling's.
ContextDistillationResult = RejectionSamplingResult


def validate_context_distillation(
    cfg: ContextDistillationJobConfig, world_size: int
) -> LlamaConfig:
    """Check the job from config files alone; returns the policy's model config."""
    if not cfg.policy:
        raise ValueError("policy is not set; point it at the checkpoint to distill into")
    if not cfg.tokenizer:
        raise ValueError("tokenizer is not set; pass the policy's tokenizer.model")
    if not cfg.prompts:
        raise ValueError("prompts is empty; set prompts=[FILE.jsonl, ...]")
    if not cfg.safety_rm:
        raise ValueError(
            "safety_rm is not set; context distillation keeps an answer only where the Safety "
            "RM scores it higher, so pass safety_rm=PATH (a Safety RM checkpoint)"
        )
    model = source_config(cfg.policy)
    if not model.is_lm_head:
        raise ValueError(f"policy {cfg.policy} is a reward model; distill into a language model")
    for name in ("safety_rm", "helpfulness_rm"):
        path = getattr(cfg, name)
        if path and source_config(path).output_dim != 1:
            raise ValueError(f"{name}={path} is not a reward model (scalar head)")
    cfg.preprompt.validate()
    cfg.sampling.validate("sampling")
    if cfg.micro_batch < 1 or cfg.max_len < 2:
        raise ValueError("micro_batch must be >= 1 and max_len >= 2")
    check_collective_timeout(cfg.collective_timeout_s, "collective_timeout_s")
    cfg.parallel.validate(world_size, model)
    if cfg.finetune:
        # The fine-tuning run's settings, checked now rather than after sampling.
        validate_sft(copy.deepcopy(fine_tune_config(cfg, Path(cfg.prompts[0]))), world_size)
    return model


def preprompt_of(prompt: Prompt, p: PrepromptConfig) -> str:
    return safety_preprompt(
        prompt.key,
        prompt.risk_category if p.use_templates else None,
        adjectives=p.adjectives,
        num_adjectives=p.num_adjectives,
        templates=p.templates,
        seed=p.seed,
    )


def split_prompts(
    prompts: list[Prompt],
    cfg: ContextDistillationJobConfig,
    tokenizer: Tokenizer,
    model: LlamaConfig,
) -> tuple[list[Prompt], list[Prompt]]:
    """(the safety-tagged prompts, the helpful ones); refuses a set without tagged prompts,
    a risk category without an answer template, and a pre-prompted prompt too long for the
    model."""
    adversarial = [p for p in prompts if p.safety_tagged]
    if not adversarial:
        raise ValueError(
            f"no safety_tagged prompts in {cfg.prompts}; context distillation applies to "
            'adversarial prompts only: mark them with "safety_tagged": true'
        )
    if cfg.preprompt.use_templates:
        unknown = [
            p for p in adversarial if p.risk_category not in (None, *cfg.preprompt.templates)
        ]
        if unknown:
            raise ValueError(
                f"{unknown[0].where}: risk_category {unknown[0].risk_category!r} has no answer "
                f"template ({len(unknown)} prompts like it); known: "
                f"{sorted(cfg.preprompt.templates)}. Add it to preprompt.templates, fix the "
                "record, or set preprompt.use_templates=false"
            )
    longest = max(
        len(
            encode_dialog(
                tokenizer,
                with_preprompt(
                    p.dialog, preprompt_of(p, cfg.preprompt), placement=cfg.preprompt.placement
                ),
            ).ids
        )
        for p in adversarial
    )
    if longest + cfg.sampling.max_new_tokens > model.max_seq_len:
        raise ValueError(
            f"the longest pre-prompted prompt ({longest} tokens) plus "
            f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} exceeds the policy's "
            f"max_seq_len={model.max_seq_len}; shorten the templates or the prompts, or lower "
            "sampling.max_new_tokens"
        )
    return adversarial, [p for p in prompts if not p.safety_tagged]


def _distill_work(gen_model, safety: RewardModelScorer, cfg, tokenizer, mesh):
    """`run_batches` work: a batch's answers without and with the pre-prompt, both scored by
    the Safety RM on the prompt without the pre-prompt."""
    s = cfg.sampling

    def work(batch: list[Prompt]) -> list[dict]:
        preprompts = [preprompt_of(p, cfg.preprompt) for p in batch]
        # Two independent draws (greedy decoding ignores the seeds): the answer without the
        # pre-prompt is the one `answer_work` would give, the other a fresh sample.
        seed = batch_seed(batch, s.seed)
        original = generate_answers(
            gen_model,
            [p.dialog for p in batch],
            tokenizer=tokenizer,
            mesh=mesh,
            sampling=s,
            seed=seed,
        )
        prefixed = [
            with_preprompt(p.dialog, pre, placement=cfg.preprompt.placement)
            for p, pre in zip(batch, preprompts, strict=True)
        ]
        distilled = generate_answers(
            gen_model, prefixed, tokenizer=tokenizer, mesh=mesh, sampling=s, seed=seed + 1
        )
        before = safety.score(batch, original).tolist()
        after = safety.score(batch, distilled).tolist()
        return [
            {
                "prompt_key": p.key,
                "dialog": p.dialog,
                "risk_category": p.risk_category,
                "preprompt": pre,
                "original": {"response": o, "safety": b},
                "distilled": {"response": d, "safety": a},
            }
            for p, pre, o, d, b, a in zip(
                batch, preprompts, original, distilled, before, after, strict=True
            )
        ]

    return work


def _scorers(cfg, tokenizer, mesh, device) -> dict[str, RewardModelScorer]:
    out = {}
    for name, path in (("safety", cfg.safety_rm), ("helpfulness", cfg.helpfulness_rm)):
        if path:
            out[name] = reward_model_scorer(
                path,
                tokenizer,
                micro_batch=cfg.micro_batch,
                max_len=cfg.max_len,
                parallel=cfg.parallel,
                mesh=mesh,
                device=device,
            )
    return out


def _all_answered(folder: Path, prompts: list[Prompt]) -> bool:
    done = [set(read_records(folder)) >= {p.key for p in prompts} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(done, src=0)
    return bool(done[0])


def _answer(
    cfg: ContextDistillationJobConfig,
    checkpoint: str,
    tokenizer: Tokenizer,
    *,
    distill: list[Prompt],
    answer: list[Prompt],
    folders: tuple[Path, Path],
    device: torch.device,
) -> None:
    """Generate with `checkpoint`: the `distill` prompts without and with the pre-prompt into
    folders[0], the `answer` prompts as they are into folders[1]."""
    todo_distill = bool(distill) and not _all_answered(folders[0], distill)
    todo_answer = bool(answer) and not _all_answered(folders[1], answer)
    if not (todo_distill or todo_answer):
        return
    mesh = build_mesh(cfg.parallel, device=device.type)
    policy = build_llama(source_config(checkpoint), cfg.parallel, mesh, device=device)
    load_initial_weights(policy, checkpoint)
    policy.requires_grad_(False)
    scorers = _scorers(cfg, tokenizer, mesh, device)
    n = cfg.sampling.prompts_per_batch
    with consolidated_for_generation(policy, mesh) as gen_model:
        if todo_distill:
            work = _distill_work(gen_model, scorers["safety"], cfg, tokenizer, mesh)
            run_batches(distill, work, prompts_per_batch=n, folder=folders[0], mesh=mesh)
        if todo_answer:
            work = answer_work(
                gen_model, scorers, tokenizer=tokenizer, mesh=mesh, sampling=cfg.sampling
            )
            run_batches(answer, work, prompts_per_batch=n, folder=folders[1], mesh=mesh)
    del policy, scorers
    gc.collect()


def keep_distilled(adversarial: list[Prompt], records: dict[str, dict]) -> tuple[list[dict], dict]:
    """The kept SFT records (the pre-prompted answer, where non-empty and the Safety RM scores
    it higher than the answer without the pre-prompt) and the statistics of the gate."""
    lines = [records[p.key] for p in adversarial]
    before = torch.tensor([r["original"]["safety"] for r in lines])
    after = torch.tensor([r["distilled"]["safety"] for r in lines])
    gate = rm_gate(before, after).tolist()
    kept, per_category = [], {}
    for r, keep in zip(lines, gate, strict=True):
        keep = keep and bool(r["distilled"]["response"])
        counts = per_category.setdefault(r["risk_category"] or "uncategorized", [0, 0])
        counts[0] += 1
        counts[1] += keep
        if keep:
            kept.append(
                {
                    "messages": [
                        *r["dialog"],
                        {"role": "assistant", "content": r["distilled"]["response"]},
                    ],
                    "prompt_key": r["prompt_key"],
                    "risk_category": r["risk_category"],
                    "preprompt": r["preprompt"],
                    "safety_before": r["original"]["safety"],
                    "safety_after": r["distilled"]["safety"],
                }
            )
    stats = {
        "adversarial_prompts": len(lines),
        "kept": len(kept),
        "kept_fraction": len(kept) / len(lines),
        "mean_safety_without_preprompt": before.mean().item(),
        "mean_safety_with_preprompt": after.mean().item(),
        "mean_safety_of_kept_before": _mean([k["safety_before"] for k in kept]),
        "mean_safety_of_kept_after": _mean([k["safety_after"] for k in kept]),
        "per_category": {
            c: {"prompts": n, "kept": k} for c, (n, k) in sorted(per_category.items())
        },
    }
    return kept, stats


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def after_finetuning(
    adversarial: list[Prompt],
    helpful: list[Prompt],
    samples: dict[str, dict],
    before: dict[str, dict],
    after: dict[str, dict],
) -> dict:
    """Mean RM scores of the policy and of the fine-tuned model: Safety RM on the adversarial
    prompts, Helpfulness RM on the helpful ones (None where not measured)."""

    def mean(records: dict, prompts: list[Prompt], name: str) -> float | None:
        values = [records[p.key].get(name) for p in prompts if p.key in records]
        return None if not values or None in values else _mean(values)

    policy_safety = [samples[p.key]["original"]["safety"] for p in adversarial]
    return {
        "safety_on_adversarial": {
            "policy": _mean(policy_safety),
            "fine_tuned": mean(after, adversarial, "safety"),
        },
        "helpfulness_on_helpful": {
            "policy": mean(before, helpful, "helpfulness"),
            "fine_tuned": mean(after, helpful, "helpfulness"),
        },
        "safety_on_helpful": {
            "policy": mean(before, helpful, "safety"),
            "fine_tuned": mean(after, helpful, "safety"),
        },
    }


def write_report(
    folder: Path,
    cfg: ContextDistillationJobConfig,
    stats: dict,
    samples: list[dict],
    comparison: dict | None,
    scores: dict[str, dict[str, list[float]]],
) -> str:
    placement = {
        "system": "the system message (before the prompt's own system text)",
        "prefix": "prefixed to the user message",
    }[cfg.preprompt.placement]
    lines = [
        "# Safety context distillation",
        "",
        f"The safety pre-prompt is {placement}; the Safety RM scores every answer on the prompt "
        "without it, and an answer given with the pre-prompt is kept only when it scores higher "
        "than the answer without it.",
        "",
        f"- adversarial (safety-tagged) prompts: {stats['adversarial_prompts']}",
        f"- kept: {stats['kept']} ({100 * stats['kept_fraction']:.1f}%)",
        "- mean Safety RM score without the pre-prompt: "
        + _fmt(stats["mean_safety_without_preprompt"]),
        "- mean Safety RM score with the pre-prompt: " + _fmt(stats["mean_safety_with_preprompt"]),
        f"- kept answers: {_fmt(stats['mean_safety_of_kept_before'])} without, "
        f"{_fmt(stats['mean_safety_of_kept_after'])} with the pre-prompt",
        "",
        "| risk category | prompts | kept | kept fraction |",
        "|---|---:|---:|---:|",
    ]
    for category, c in stats["per_category"].items():
        lines.append(
            f"| {category} | {c['prompts']} | {c['kept']} | {c['kept'] / c['prompts']:.3f} |"
        )
    lines += ["", "## After fine-tuning on the kept set", ""]
    if comparison is None:
        lines.append("Not fine-tuned yet (or finetune=false).")
    else:
        lines += [
            "Answers without any pre-prompt, the same sampling for both models.",
            "",
            "| prompts | score | policy | fine-tuned | change |",
            "|---|---|---:|---:|---:|",
        ]
        for key, (prompts, score) in {
            "safety_on_adversarial": ("adversarial", "Safety RM"),
            "helpfulness_on_helpful": ("helpful", "Helpfulness RM"),
            "safety_on_helpful": ("helpful", "Safety RM"),
        }.items():
            row = comparison[key]
            if row["policy"] is None and row["fine_tuned"] is None:
                continue
            change = (
                None
                if row["policy"] is None or row["fine_tuned"] is None
                else row["fine_tuned"] - row["policy"]
            )
            cells = [_fmt(row["policy"]), _fmt(row["fine_tuned"]), _fmt(change)]
            lines.append(f"| {prompts} | {score} | " + " | ".join(cells) + " |")
        if comparison["helpfulness_on_helpful"]["policy"] is None:
            lines += [
                "",
                "Helpfulness on the helpful prompts is not measured here (no helpfulness_rm, or "
                "no helpful prompts); the safety evaluation stage compares the checkpoints on it.",
            ]
    text = "\n".join(lines) + "\n"
    (folder / "report.md").write_text(text)
    _plot(folder / "safety_scores.png", samples, scores)
    return text


def _plot(path: Path, samples: list[dict], scores: dict[str, dict[str, list[float]]]) -> None:
    """The paper's Figure 16: the Safety RM score distribution without and with the
    pre-prompt (and of the fine-tuned model), the gain against the original score, and the
    Helpfulness RM scores on the helpful prompts before and after fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if scores.get("helpfulness") else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    bins = [i / 20 for i in range(21)]
    for label, values in scores["safety"].items():
        axes[0].hist(values, bins=bins, alpha=0.5, label=label)
    axes[0].set_xlabel("Safety RM score")
    axes[0].set_ylabel("adversarial prompts")
    axes[0].set_title("Safety RM scores")
    axes[0].legend()
    before = [r["original"]["safety"] for r in samples]
    gain = [r["distilled"]["safety"] - r["original"]["safety"] for r in samples]
    kept = [g > 0 and bool(r["distilled"]["response"]) for r, g in zip(samples, gain, strict=True)]
    axes[1].scatter(
        [b for b, k in zip(before, kept, strict=True) if k],
        [g for g, k in zip(gain, kept, strict=True) if k],
        s=12,
        label="kept",
    )
    axes[1].scatter(
        [b for b, k in zip(before, kept, strict=True) if not k],
        [g for g, k in zip(gain, kept, strict=True) if not k],
        s=12,
        label="dropped",
    )
    axes[1].axhline(0.0, color="gray", linewidth=0.8)
    axes[1].tick_params(axis="x", labelrotation=30)
    axes[1].set_xlabel("Safety RM score without the pre-prompt")
    axes[1].set_ylabel("score with - without")
    axes[1].set_title("The RM gate")
    axes[1].legend()
    if panels == 3:
        for label, values in scores["helpfulness"].items():
            axes[2].hist(values, bins=bins, alpha=0.5, label=label)
        axes[2].set_xlabel("Helpfulness RM score")
        axes[2].set_ylabel("helpful prompts")
        axes[2].set_title("Helpfulness on helpful prompts")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(folder, cfg, adversarial, helpful, *, finished: bool) -> str:
    samples = read_records(folder / SAMPLES)
    before, after = read_records(folder / HELPFUL_BEFORE), read_records(folder / AFTER)
    kept, stats = keep_distilled(adversarial, samples)
    ordered = [samples[p.key] for p in adversarial]
    scores: dict[str, dict[str, list[float]]] = {
        "safety": {
            "without pre-prompt": [r["original"]["safety"] for r in ordered],
            "with pre-prompt": [r["distilled"]["safety"] for r in ordered],
        },
        "helpfulness": {},
    }
    comparison = None
    if finished:
        comparison = after_finetuning(adversarial, helpful, samples, before, after)
        scores["safety"]["fine-tuned, without"] = [after[p.key]["safety"] for p in adversarial]
        if cfg.helpfulness_rm and helpful:
            scores["helpfulness"] = {
                "policy": [before[p.key]["helpfulness"] for p in helpful],
                "fine-tuned": [after[p.key]["helpfulness"] for p in helpful],
            }
    summary = {**stats, "after_finetuning": comparison}
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return write_report(folder, cfg, stats, ordered, comparison, scores)


def context_distillation(
    cfg: ContextDistillationJobConfig, run_dir: Path
) -> ContextDistillationResult:
    """Run (or resume) the stage into `run_dir`; every rank calls this."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_cfg = validate_context_distillation(cfg, world_size)
    tokenizer = check_tokenizer(cfg.tokenizer, model_cfg.vocab_size)
    assert tokenizer is not None
    prompts = read_prompts(cfg.prompts, skip_invalid=cfg.skip_invalid)
    adversarial, helpful = split_prompts(prompts, cfg, tokenizer, model_cfg)
    run_dir = Path(run_dir)
    device = open_run(
        run_dir, cfg, device=cfg.device, collective_timeout_s=cfg.collective_timeout_s
    )
    kept_file = run_dir / KEPT_FILE
    measure_helpful = helpful if cfg.helpfulness_rm else []

    if not kept_file.is_file():
        _answer(
            cfg,
            cfg.policy,
            tokenizer,
            distill=adversarial,
            answer=measure_helpful,
            folders=(run_dir / SAMPLES, run_dir / HELPFUL_BEFORE),
            device=device,
        )
        if dist.get_rank() == 0:
            kept, _ = keep_distilled(adversarial, read_records(run_dir / SAMPLES))
            tmp = kept_file.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept))
            tmp.replace(kept_file)
            print(_report(run_dir, cfg, adversarial, helpful, finished=False), flush=True)
        dist.barrier()
    else:
        log.info("already sampled (%s)", kept_file)
    if not cfg.finetune:
        return ContextDistillationResult(kept_file)
    if not kept_file.read_text().strip():
        raise ValueError(
            f"no distilled answer scored higher than the answer without the pre-prompt "
            f"({run_dir / 'report.md'}); nothing to fine-tune on. Try other templates or "
            "more prompts"
        )

    state = sft(fine_tune_config(cfg, kept_file), run_dir / "sft")
    if state.stopped:
        return ContextDistillationResult(kept_file, state)
    _answer(
        cfg,
        str(run_dir / "sft" / "checkpoints"),
        tokenizer,
        distill=[],
        answer=adversarial + measure_helpful,
        folders=(run_dir / SAMPLES, run_dir / AFTER),
        device=device,
    )
    if dist.get_rank() == 0:
        print(_report(run_dir, cfg, adversarial, helpful, finished=True), flush=True)
    dist.barrier()
    return ContextDistillationResult(kept_file, state)


__all__ = [
    "context_distillation",
    "keep_distilled",
    "split_prompts",
    "validate_context_distillation",
]
