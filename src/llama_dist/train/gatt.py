"""Ghost Attention as a stage (llama2.md, "Ghost Attention, GAtt").

The policy (the latest RLHF model) answers multi-turn dialogs turn by turn with the dialog's
instruction concatenated to every user message (`data.gatt`); the training samples keep the
instruction in the first user turn only and put the loss on the last turn only; the policy is
fine-tuned on them with the SFT loop. Then every model talks through held-out dialogs with the
instruction in the first turn only, and `rlhf.gatt_eval` checks each answer: the adherence
table per instruction kind and turn (the paper's Table 30) before and after, and the attention
the last answer pays to the instruction per layer (its Figure 10).

Sampling runs on the data-parallel ranks, each its share of the dialogs, all turns of a turn
in one round, through the policy consolidated once for generation; rank 0 gathers the
answers in dialog order, so the data does not depend on the number of ranks under greedy
decoding. With responder=rule a rule plays the policy (it follows the instruction while it
is in the turn, `data.gatt.RuleResponder`), for the synthetic task on a model too small to
follow instructions yet. A dialog that outgrows the model's max_seq_len ends there when
sampled; in the evaluation its oldest turns after the first are left out of the prompt, as in
a chat session (both counted, `PolicyResponder`).

    dialogs.jsonl, eval_dialogs.jsonl   the training and held-out dialogs with instructions
    gatt_data.jsonl      the GAtt samples (SFT records, "train_on": "last"); gatt_data.json
                         their counts and what they were built from
    sft/                 the fine-tuning run: sft/checkpoints is the GAtt model
    baseline_data.jsonl, baseline/sft/   with baseline=true: the same dialogs without GAtt
                         (instruction in the first turn only, every turn trained) and their
                         fine-tuning, the comparison of Table 30
    adherence-{policy,gatt,baseline}.json   each model's table; attention-*.png its heat map
    adherence.md, summary.json

A rerun skips every part whose file is there (built from the same inputs; other inputs are
an error), and the SFT runs resume from their checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llama_dist.checkpoint.init import load_initial_weights, source_config
from llama_dist.config import GATT_RESPONDERS, GattJobConfig, check_collective_timeout
from llama_dist.data.chat import encode_dialog
from llama_dist.data.gatt import (
    PLACEMENTS,
    GattDialog,
    Responder,
    RuleResponder,
    augment,
    baseline_records,
    build_records,
    conversation,
    data_summary,
    max_turns,
    model_responder,
    read_gatt_dialogs,
    sample_answers,
    with_instructions,
    write_gatt_dialogs,
    write_synthetic_dialogs,
)
from llama_dist.generation_dist import consolidated_for_generation
from llama_dist.models.config import LlamaConfig
from llama_dist.parallel import build_llama, build_mesh, dp_rank_and_size
from llama_dist.rlhf.gatt_eval import (
    AdherenceTable,
    evaluate_adherence,
    plot_system_attention,
    system_attention,
)
from llama_dist.tokenizer import Tokenizer
from llama_dist.train.common import open_run
from llama_dist.train.pretrain import check_tokenizer
from llama_dist.train.rejection_sampling import RejectionSamplingResult, fine_tune_config
from llama_dist.train.sft import sft, validate_sft

log = logging.getLogger("llama_dist.train.gatt")

DIALOGS_FILE, EVAL_DIALOGS_FILE = "dialogs.jsonl", "eval_dialogs.jsonl"
GATT_DATA, BASELINE_DATA = "gatt_data.jsonl", "baseline_data.jsonl"
REPORT_FILE, SUMMARY_FILE = "adherence.md", "summary.json"
# The evaluated models: name -> (label in the report, checkpoint below the run folder).
MODELS = {
    "policy": ("policy (before GAtt)", None),
    "gatt": ("GAtt fine-tuned", "sft/checkpoints"),
    "baseline": ("fine-tuned without GAtt (baseline)", "baseline/sft/checkpoints"),
}
# What the stage produced: the GAtt data and its fine-tuning, as rejection sampling's.
GattResult = RejectionSamplingResult


# Checks -------------------------------------------------------------------------------------
def validate_gatt(cfg: GattJobConfig, world_size: int) -> LlamaConfig:
    """Check the job from config files alone; returns the policy's model config."""
    if not cfg.policy:
        raise ValueError("policy is not set; point it at the checkpoint to sample with and tune")
    if not cfg.tokenizer:
        raise ValueError("tokenizer is not set; pass the policy's tokenizer.model")
    if not Path(cfg.tokenizer).is_file():
        raise ValueError(f"tokenizer={cfg.tokenizer} does not exist")
    model = source_config(cfg.policy)
    if not model.is_lm_head:
        raise ValueError(f"policy {cfg.policy} is a reward model; GAtt tunes a language model")
    if cfg.responder not in GATT_RESPONDERS:
        raise ValueError(f"responder={cfg.responder!r} must be one of {GATT_RESPONDERS}")
    if cfg.placement not in PLACEMENTS:
        raise ValueError(f"placement={cfg.placement!r} must be one of {PLACEMENTS}")
    if cfg.num_turns < 1:
        raise ValueError(f"num_turns={cfg.num_turns} must be >= 1")
    for path in [*cfg.dialogs, *cfg.eval.dialogs]:
        if not Path(path).is_file():
            raise ValueError(f"dialog file {path} does not exist; check dialogs / eval.dialogs")
    if not cfg.dialogs:
        cfg.synthetic.validate()
        if not cfg.eval.dialogs and cfg.eval.seed == cfg.synthetic.seed:
            raise ValueError(
                f"eval.seed={cfg.eval.seed} equals synthetic.seed: the held-out dialogs would be "
                "the training dialogs; give eval.seed another value"
            )
    cfg.instructions.validate()
    cfg.sampling.validate("sampling")
    cfg.eval.validate()
    check_collective_timeout(cfg.collective_timeout_s, "collective_timeout_s")
    cfg.parallel.validate(world_size, model)
    # The fine-tuning's settings, checked now rather than after sampling; the data is not
    # written yet, so an existing file stands in for it (only its existence is checked).
    validate_sft(copy.deepcopy(fine_tune_config(cfg, Path(cfg.tokenizer))), world_size)
    return model


def check_first_turns(
    dialogs: Sequence[GattDialog],
    tokenizer: Tokenizer,
    *,
    max_seq_len: int,
    max_new_tokens: int,
    augmented: bool,
    placement: str,
    key: str,
) -> None:
    """Refuse dialogs whose first turn cannot be answered within `max_seq_len` (augmented:
    with the instruction before the user message, as GAtt samples)."""
    longest = 0
    for d in dialogs:
        if augmented:
            view = conversation(augment(d.users[:1], d.instruction.full_text), [])
        else:
            view = conversation(d.users[:1], [], system=d.instruction.text, placement=placement)
        longest = max(longest, len(encode_dialog(tokenizer, view).ids))
    if longest + max_new_tokens > max_seq_len:
        raise ValueError(
            f"the longest first turn ({longest} tokens) plus {key}={max_new_tokens} exceeds "
            f"the policy's max_seq_len={max_seq_len}; lower {key} or shorten the dialogs"
        )


def load_dialogs(
    cfg: GattJobConfig, tokenizer: Tokenizer, model: LlamaConfig
) -> tuple[list[GattDialog], list[GattDialog]]:
    """(training dialogs, held-out dialogs), every dialog with an instruction, the held-out
    ones each with a check; read or generated the same way on every rank."""
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.dialogs:
            train = [d for path in cfg.dialogs for d in read_gatt_dialogs(path)]
        else:
            s = cfg.synthetic
            path = write_synthetic_dialogs(
                Path(tmp) / "train.jsonl",
                s.n,
                s.turns,
                s.seed,
                words_per_turn=tuple(s.words_per_turn),
            )
            train = read_gatt_dialogs(path)
        if cfg.eval.dialogs:
            held_out = [d for path in cfg.eval.dialogs for d in read_gatt_dialogs(path)]
        elif cfg.dialogs:
            if len(train) <= cfg.eval.num_dialogs:
                raise ValueError(
                    f"{len(train)} dialogs in {cfg.dialogs}, not more than eval.num_dialogs="
                    f"{cfg.eval.num_dialogs} to hold out; lower eval.num_dialogs or pass "
                    "eval.dialogs=[FILE.jsonl]"
                )
            train, held_out = train[: -cfg.eval.num_dialogs], train[-cfg.eval.num_dialogs :]
        else:
            path = write_synthetic_dialogs(
                Path(tmp) / "eval.jsonl",
                cfg.eval.num_dialogs,
                cfg.eval.num_turns,
                cfg.eval.seed,
                words_per_turn=tuple(cfg.synthetic.words_per_turn),
            )
            held_out = read_gatt_dialogs(path)
    i = cfg.instructions
    train = with_instructions(
        train,
        random.Random(i.seed),
        max_constraints=i.max_constraints,
        require_check=i.require_check,
        short_prob=i.short_prob,
    )
    held_out = with_instructions(
        held_out,
        random.Random(cfg.eval.seed),
        max_constraints=i.max_constraints,
        require_check=True,
        short_prob=i.short_prob,
    )
    unchecked = [n for n, d in enumerate(held_out) if not d.instruction.checks]
    if unchecked:
        raise ValueError(
            f"held-out dialogs {unchecked[:5]} carry instructions without a checkable rule, "
            "so their adherence cannot be measured; give them a rule (rlhf/instructions.py) "
            "or leave their instruction out to have one drawn"
        )
    if cfg.responder == "policy":
        check_first_turns(
            train,
            tokenizer,
            max_seq_len=model.max_seq_len,
            max_new_tokens=cfg.sampling.max_new_tokens,
            augmented=True,
            placement=cfg.placement,
            key="sampling.max_new_tokens",
        )
    check_first_turns(
        held_out,
        tokenizer,
        max_seq_len=model.max_seq_len,
        max_new_tokens=cfg.eval.sampling.max_new_tokens,
        augmented=False,
        placement=cfg.placement,
        key="eval.sampling.max_new_tokens",
    )
    return train, held_out


# Files --------------------------------------------------------------------------------------
def _dialogs_text(dialogs: Sequence[GattDialog]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return write_gatt_dialogs(Path(tmp) / "d.jsonl", dialogs).read_text(encoding="utf-8")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    _write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _done(path: Path, inputs: dict[str, Any]) -> dict | None:
    """The record at `path` (a finished part) if it was made from `inputs`; None if there is
    none; ValueError if it was made from other inputs."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("inputs") != inputs:
        changed = sorted(
            k
            for k in inputs.keys() | record.get("inputs", {}).keys()
            if inputs.get(k) != record.get("inputs", {}).get(k)
        )
        raise ValueError(
            f"{path} was made from other inputs ({', '.join(changed)} changed); run into "
            "another folder (hydra.run.dir) or delete that file and what was built from it"
        )
    return record


# Sampling and evaluating on the ranks -------------------------------------------------------
@contextlib.contextmanager
def _generation_model(
    cfg: GattJobConfig, checkpoint: str, device: torch.device
) -> Iterator[tuple[Any, Any]]:
    """(the consolidated copy of `checkpoint` for generation, the mesh), freed on exit."""
    mesh = build_mesh(cfg.parallel, device=device.type)
    model = build_llama(source_config(checkpoint), cfg.parallel, mesh, device=device)
    load_initial_weights(model, checkpoint)
    model.requires_grad_(False)
    try:
        with consolidated_for_generation(model, mesh) as gen_model:
            yield gen_model, mesh
    finally:
        del model
        gc.collect()


class PolicyResponder:
    """The consolidated policy's answers (`data.gatt.model_responder`) in batches of
    `sampling.prompts_per_batch`; the ranks of a tp group hold the same dialogs, so they make
    the same calls. A dialog too long to answer within max_seq_len: with drop_history, its
    oldest turns after the first (which holds the instruction) are left out of the prompt, as
    a chat session does; otherwise, and if even that does not fit, the answer is empty (which
    ends the dialog when sampling). Both are counted."""

    def __init__(self, gen_model, tokenizer: Tokenizer, sampling, mesh, *, drop_history: bool):
        dp_rank, _ = dp_rank_and_size(mesh)
        self.respond = model_responder(
            gen_model,
            tokenizer,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed * 7919 + dp_rank,
            mesh=mesh,
        )
        self.tokenizer, self.size = tokenizer, sampling.prompts_per_batch
        self.room = gen_model.cfg.max_seq_len - sampling.max_new_tokens
        self.drop_history = drop_history
        self.shortened = self.unanswered = 0

    def _fitted(self, view: list[dict]) -> list[dict] | None:
        if len(encode_dialog(self.tokenizer, view).ids) <= self.room:
            return view
        head = 2 if view[0]["role"] == "user" else 3  # the first turn, with a system message
        while self.drop_history and len(view) > head + 1:
            view = view[:head] + view[head + 2 :]
            if len(encode_dialog(self.tokenizer, view).ids) <= self.room:
                self.shortened += 1
                return view
        self.unanswered += 1
        return None

    def __call__(self, views: list[list[dict]]) -> list[str]:
        fitted = [self._fitted(v) for v in views]
        todo = [v for v in fitted if v is not None]
        answers = iter(
            [
                a
                for i in range(0, len(todo), self.size)
                for a in self.respond(todo[i : i + self.size])
            ]
        )
        return ["" if v is None else next(answers) for v in fitted]


def _gathered(mine: Any, mesh: Any) -> list[Any] | None:
    """Rank 0: every data-parallel rank's `mine`, in dp order (one per tp group); else None."""
    dp_rank, dp_size = dp_rank_and_size(mesh)
    everything: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((dp_rank, mine), everything, dst=0)
    if everything is None:
        return None
    by_dp = dict(everything)
    return [by_dp[r] for r in range(dp_size)]


def _interleaved(parts: list[list[Any]]) -> list[Any]:
    """The items of dialogs[r::n] for r = 0..n-1, back in dialog order."""
    out = []
    for k in range(max((len(p) for p in parts), default=0)):
        out += [p[k] for p in parts if k < len(p)]
    return out


def _sample(
    dialogs: Sequence[GattDialog], respond: Responder, mesh: Any, **kw: Any
) -> list[list[str]] | None:
    """Every dialog's answers (rank 0; None elsewhere), each dp rank sampling its share."""
    dp_rank, dp_size = dp_rank_and_size(mesh)
    mine = sample_answers(dialogs[dp_rank::dp_size], respond, **kw)
    parts = _gathered(mine, mesh)
    return None if parts is None else _interleaved(parts)


def _adherence(
    dialogs: Sequence[GattDialog],
    respond: PolicyResponder,
    mesh: Any,
    *,
    num_turns: int,
    placement: str,
) -> tuple[AdherenceTable, dict[str, int]] | None:
    """The adherence table over every rank's share of `dialogs` and the responder's counts
    (rank 0; None elsewhere)."""
    dp_rank, dp_size = dp_rank_and_size(mesh)
    mine = evaluate_adherence(
        respond, dialogs[dp_rank::dp_size], num_turns=num_turns, placement=placement
    )
    parts = _gathered((mine, respond.shortened, respond.unanswered), mesh)
    if parts is None:
        return None
    tables = [p[0] for p in parts]
    table = AdherenceTable(num_turns=num_turns, answers=_interleaved([t.answers for t in tables]))
    for part in tables:
        for kind, counted in part.counted.items():
            for turn, (n, ok) in enumerate(zip(counted, part.passed[kind], strict=True)):
                table.counted.setdefault(kind, [0] * num_turns)[turn] += n
                table.passed.setdefault(kind, [0] * num_turns)[turn] += ok
    counts = {
        "answers_with_history_dropped": sum(p[1] for p in parts),
        "unanswered_too_long": sum(p[2] for p in parts),
    }
    return table, counts


def _table_record(table: AdherenceTable, inputs: dict) -> dict:
    return {
        "inputs": inputs,
        "num_turns": table.num_turns,
        "rows": table.rows(),
        "passed": table.passed,
        "counted": table.counted,
        "answers": table.answers,
    }


def _table_of(record: dict) -> AdherenceTable:
    return AdherenceTable(
        num_turns=record["num_turns"],
        passed=record["passed"],
        counted=record["counted"],
        answers=record["answers"],
    )


def _attention_map(
    gen_model,
    tokenizer: Tokenizer,
    d: GattDialog,
    answers: list[str],
    path: Path,
    *,
    label: str,
    placement: str,
) -> bool:
    """The heat map of the attention the last answer that fits pays to the instruction."""
    text = d.instruction.text
    for k in range(min(len(answers), len(d.users)), 0, -1):
        dialog = conversation(d.users[:k], answers[:k], system=text, placement=placement)
        if len(encode_dialog(tokenizer, dialog).ids) <= gen_model.cfg.max_seq_len:
            result = system_attention(gen_model, tokenizer, dialog, instruction=text)
            plot_system_attention(
                result, path, title=f"{label}: attention to the instruction at turn {k}"
            )
            return True
    return False


# The report ---------------------------------------------------------------------------------
def _fraction(part: int, whole: int) -> str:
    return f"{part} of {whole} ({100 * part / whole:.0f}%)" if whole else "none"


def write_report(
    run_dir: Path, cfg: GattJobConfig, data: dict[str, dict], records: dict[str, dict]
) -> str:
    """adherence.md and summary.json from the data counts and each model's adherence record
    (`adherence-<model>.json`)."""
    tables = {name: _table_of(record) for name, record in records.items()}
    responder = {
        "policy": f"the policy ({cfg.policy})",
        "rule": "a rule that follows the instruction while it is in the turn",
    }[cfg.responder]
    lines = [
        "# Ghost Attention",
        "",
        f"Answers sampled by {responder}, the instruction before every user message; the "
        "samples keep it in the first turn only and train on the last turn.",
        "",
    ]
    for name, stats in data.items():
        lines.append(
            f"- {name} data: {stats['dialogs']} dialogs, {stats['records']} samples; sampled "
            "answers that follow a checkable instruction: "
            + _fraction(stats["checked_answers_followed"], stats["checked_answers"])
        )
    lines += [
        "",
        "## Adherence",
        "",
        "Share of answers at each turn that follow the first turn's instruction (given in the "
        "first user turn only), on held-out dialogs.",
        "",
    ]
    n = max(t.num_turns for t in tables.values())
    lines += [
        "| model | " + " | ".join(f"turn {t}" for t in range(1, n + 1)) + " |",
        "|---|" + "---:|" * n,
    ]
    for name, table in tables.items():
        row = table.rows()["all"]
        cells = " | ".join("-" if f is None else f"{100 * f:.0f}%" for f in row)
        lines.append(f"| {MODELS[name][0]} | {cells} |")
    for name, table in tables.items():
        lines += ["", f"### {MODELS[name][0]}", "", table.markdown().rstrip()]
        dropped, unanswered = (
            records[name].get(k, 0) for k in ("answers_with_history_dropped", "unanswered_too_long")
        )
        if dropped or unanswered:
            lines += [
                "",
                f"{dropped} answers were given with the oldest turns after the first left out "
                f"of the prompt, {unanswered} not at all (too long for max_seq_len).",
            ]
        if (run_dir / f"attention-{name}.png").is_file():
            lines += ["", f"![attention to the instruction](attention-{name}.png)"]
    text = "\n".join(lines) + "\n"
    _write(run_dir / REPORT_FILE, text)
    summary = {
        "data": data,
        "adherence": {name: table.rows() for name, table in tables.items()},
    }
    _write(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
    return text


# The stage ----------------------------------------------------------------------------------
def gatt(cfg: GattJobConfig, run_dir: Path) -> GattResult:
    """Run (or resume) the stage into `run_dir`; every rank calls this."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_cfg = validate_gatt(cfg, world_size)
    tokenizer = check_tokenizer(cfg.tokenizer, model_cfg.vocab_size)
    assert tokenizer is not None
    train, held_out = load_dialogs(cfg, tokenizer, model_cfg)
    train_text, eval_text = _dialogs_text(train), _dialogs_text(held_out)
    num_turns = min(cfg.num_turns, max_turns(train))
    sampled = {
        "dialogs": _digest(train_text),
        "responder": cfg.responder,
        "policy": cfg.policy if cfg.responder == "policy" else None,
        "sampling": asdict(cfg.sampling) if cfg.responder == "policy" else None,
        "num_turns": num_turns,
        "per_turn": cfg.per_turn,
        "placement": cfg.placement,
    }
    evaluated = {
        "dialogs": _digest(eval_text),
        "sampling": asdict(cfg.eval.sampling),
        "num_turns": cfg.eval.num_turns,
        "placement": cfg.placement,
    }
    run_dir = Path(run_dir)
    device = open_run(
        run_dir, cfg, device=cfg.device, collective_timeout_s=cfg.collective_timeout_s
    )
    rank = dist.get_rank()
    names = ["gatt", "baseline"] if cfg.baseline else ["gatt"]
    # What is done, read by every rank before anything is written: they agree on the work.
    data = {name: _done(run_dir / f"{name}_data.json", sampled) for name in names}
    tables = {
        name: _done(
            run_dir / f"adherence-{name}.json", {**evaluated, "model": _model_key(cfg, name)}
        )
        for name in ["policy", *names]
    }
    sample_todo = [name for name in names if data[name] is None]
    eval_todo = [name for name, record in tables.items() if record is None]
    if rank == 0:
        for name, text in ((DIALOGS_FILE, train_text), (EVAL_DIALOGS_FILE, eval_text)):
            if not (run_dir / name).is_file():
                _write(run_dir / name, text)

    # The policy: the data, and its own adherence.
    if sample_todo or "policy" in eval_todo:
        with contextlib.ExitStack() as stack:
            if cfg.responder == "policy" or "policy" in eval_todo:
                gen_model, mesh = stack.enter_context(_generation_model(cfg, cfg.policy, device))
            else:
                gen_model, mesh = None, build_mesh(cfg.parallel, device=device.type)
            for name in sample_todo:
                respond = (
                    PolicyResponder(gen_model, tokenizer, cfg.sampling, mesh, drop_history=False)
                    if cfg.responder == "policy"
                    else RuleResponder(follow="turn")
                )
                answers = _sample(
                    train,
                    respond,
                    mesh,
                    augmented=name == "gatt",
                    placement=cfg.placement,
                    num_turns=num_turns,
                )
                if rank == 0:
                    if name == "gatt":
                        records = build_records(
                            train, answers, per_turn=cfg.per_turn, placement=cfg.placement
                        )
                    else:
                        records = baseline_records(train, answers, placement=cfg.placement)
                    data[name] = {"inputs": sampled, **data_summary(train, answers, records)}
                    _write_jsonl(run_dir / f"{name}_data.jsonl", records)
                    _write(run_dir / f"{name}_data.json", json.dumps(data[name], indent=1))
                    log.info("%s data: %s", name, data[name])
            if "policy" in eval_todo:
                tables["policy"] = _evaluate(
                    "policy", cfg, gen_model, mesh, tokenizer, held_out, evaluated, run_dir
                )
        dist.barrier()

    # The fine-tuning runs.
    state = None
    for name in names:
        folder = run_dir / ("sft" if name == "gatt" else "baseline/sft")
        done = sft(fine_tune_config(cfg, run_dir / f"{name}_data.jsonl"), folder)
        if name == "gatt":
            state = done
        if done.stopped:
            return GattResult(run_dir / GATT_DATA, done)

    # Their adherence, and the report.
    for name in names:
        if name in eval_todo:
            checkpoint = str(run_dir / MODELS[name][1])
            with _generation_model(cfg, checkpoint, device) as (gen_model, mesh):
                tables[name] = _evaluate(
                    name, cfg, gen_model, mesh, tokenizer, held_out, evaluated, run_dir
                )
            dist.barrier()
    if rank == 0:
        stats = {name: {k: v for k, v in d.items() if k != "inputs"} for name, d in data.items()}
        print(write_report(run_dir, cfg, stats, tables), flush=True)
    dist.barrier()
    return GattResult(run_dir / GATT_DATA, state)


def _model_key(cfg: GattJobConfig, name: str) -> str:
    """What a table was measured on: the policy's path, or the run's fine-tuned model."""
    return cfg.policy if name == "policy" else name


def _evaluate(
    name: str,
    cfg: GattJobConfig,
    gen_model,
    mesh,
    tokenizer: Tokenizer,
    held_out: list[GattDialog],
    evaluated: dict,
    run_dir: Path,
) -> dict | None:
    """The adherence of the model `name` on the held-out dialogs, written on rank 0 (with its
    attention heat map, where the copy is whole on rank 0: parallel.tp=1)."""
    respond = PolicyResponder(gen_model, tokenizer, cfg.eval.sampling, mesh, drop_history=True)
    result = _adherence(
        held_out, respond, mesh, num_turns=cfg.eval.num_turns, placement=cfg.placement
    )
    if result is None:
        return None
    table, counts = result
    record = _table_record(table, {**evaluated, "model": _model_key(cfg, name)}) | counts
    if cfg.parallel.tp == 1:
        _attention_map(
            gen_model,
            tokenizer,
            held_out[0],
            table.answers[0],
            run_dir / f"attention-{name}.png",
            label=MODELS[name][0],
            placement=cfg.placement,
        )
    _write(run_dir / f"adherence-{name}.json", json.dumps(record, indent=1))
    log.info("adherence of %s: %s", name, table.rows()["all"])
    return record


__all__ = [
    "GattResult",
    "PolicyResponder",
    "check_first_turns",
    "gatt",
    "load_dialogs",
    "validate_gatt",
    "write_report",
]
