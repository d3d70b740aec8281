"""The lm-eval adapter against the harness's own HF model on the same tiny model, in one process.

A tiny Llama is saved as a llama_dist checkpoint and exported to HF; `LlamaDistLM` reads the
checkpoint, `lm_eval.models.huggingface.HFLM` the HF folder. Both tokenize with the same
SentencePiece model (HFLM through transformers' sentencepiece tokenizer, checked to give the
same ids on every text used) and add bos, so their requests are the same token ids:
per-request loglikelihoods agree to 1e-4, accuracies and greedy generations exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from eval_helpers import (
    ATOL,
    LL_REQUESTS,
    MAX_SEQ_LEN,
    REPO_ROOT,
    ROLLING,
    harness_cli,
    instances,
    per_sample,
    task_texts,
)

from llama_dist.data.chat import encode_dialog
from llama_dist.evaluation import LlamaDistLM, bundled_tasks, run_tasks
from llama_dist.generate import generate
from llama_dist.tokenizer import Tokenizer


def test_both_sides_tokenize_alike(files, hf_tokenizer):
    sp = Tokenizer(files["tokenizer"])
    texts = task_texts() + [c + x for c, x in LL_REQUESTS] + ROLLING
    for text in texts:
        assert hf_tokenizer.encode(text) == sp.encode(text, bos=True), text
        ids = sp.encode(text, bos=False)
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(ids)


def test_loglikelihood_matches_hflm(ours, theirs):
    mine = ours.loglikelihood(instances("loglikelihood", LL_REQUESTS))
    ref = theirs.loglikelihood(instances("loglikelihood", LL_REQUESTS))
    for context, continuation in LL_REQUESTS[:2]:
        assert ours._encode_pair(context, continuation) == theirs._encode_pair(
            context, continuation
        )
    for (a, greedy_a), (b, greedy_b) in zip(mine, ref, strict=True):
        assert a == pytest.approx(b, abs=ATOL)
        assert greedy_a == greedy_b
    # Greedy: the continuation of one token the model itself would pick.
    context = ours.tok_encode("the cat sat on a")
    logits = ours.model(torch.tensor([context]))[0, -1]
    best = int(logits.argmax())
    ((_, greedy),) = ours._loglikelihood_tokens([(None, context, [best])])
    assert greedy


def test_batch_size_does_not_change_loglikelihoods(files, ours):
    one = LlamaDistLM(
        checkpoint=str(files["ckpt"]),
        tokenizer=str(files["tokenizer"]),
        batch_size=1,
        device="cpu",
    )
    requests = instances("loglikelihood", LL_REQUESTS)
    for (a, ga), (b, gb) in zip(
        one.loglikelihood(requests), ours.loglikelihood(requests), strict=True
    ):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_hf_folder_with_its_tokenizer_reads_the_same_model(files, ours, tmp_path):
    # An HF folder that carries its tokenizer.model needs no tokenizer argument.
    shutil.copytree(files["hf"], tmp_path / "hf")
    shutil.copy(files["tokenizer"], tmp_path / "hf" / "tokenizer.model")
    from_hf = LlamaDistLM(checkpoint=str(tmp_path / "hf"), device="cpu")
    requests = instances("loglikelihood", LL_REQUESTS)
    for (a, ga), (b, gb) in zip(
        from_hf.loglikelihood(requests), ours.loglikelihood(requests), strict=True
    ):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_loglikelihood_rolling_matches_hflm(ours, theirs):
    requests = instances("loglikelihood_rolling", [(s,) for s in ROLLING])
    # The second string spans several windows of max_seq_len.
    assert len(ours.tok_encode(ROLLING[1])) > 2 * MAX_SEQ_LEN
    mine = ours.loglikelihood_rolling(requests)
    # HFLM prepends its prefix token (bos) to tokens that, with add_bos_token, start with bos
    # already, scoring bos after bos; without it, its windows are ours.
    theirs.add_bos_token = False
    try:
        ref = theirs.loglikelihood_rolling(requests)
    finally:
        theirs.add_bos_token = True
    assert mine == pytest.approx(ref, abs=ATOL)


def test_multiple_choice_task_matches_hflm(ours, theirs):
    mine = run_tasks(ours, ["llama_dist_mc"], log_samples=True)
    ref = run_tasks(theirs, ["llama_dist_mc"], log_samples=True)
    assert (
        mine["results"]["llama_dist_mc"]["acc,none"] == ref["results"]["llama_dist_mc"]["acc,none"]
    )
    assert (
        mine["results"]["llama_dist_mc"]["acc_norm,none"]
        == ref["results"]["llama_dist_mc"]["acc_norm,none"]
    )
    mine_samples, ref_samples = (
        per_sample(mine, "llama_dist_mc"),
        per_sample(ref, "llama_dist_mc"),
    )
    assert len(mine_samples) == 8
    for (doc_a, resps_a), (doc_b, resps_b) in zip(mine_samples, ref_samples, strict=True):
        assert doc_a == doc_b
        for a, b in zip(resps_a, resps_b, strict=True):
            assert a[0] == pytest.approx(b[0], abs=ATOL)


def test_generation_task_matches_hflm(ours, theirs):
    mine = run_tasks(ours, ["llama_dist_gen"], log_samples=True)
    ref = run_tasks(theirs, ["llama_dist_gen"], log_samples=True)
    mine_samples, ref_samples = (
        per_sample(mine, "llama_dist_gen"),
        per_sample(ref, "llama_dist_gen"),
    )
    assert len(mine_samples) == 6
    assert mine_samples == ref_samples
    # Something was generated, and no output runs past a stop string.
    outputs = [resps[0] for _, resps in mine_samples]
    assert any(outputs) and not any("\n" in o or "." in o for o in outputs)
    assert (
        mine["results"]["llama_dist_gen"]["exact_match,none"]
        == ref["results"]["llama_dist_gen"]["exact_match,none"]
    )


def test_generate_until_limits_and_sampling(ours):
    args = {"until": [], "max_gen_toks": 5, "do_sample": False}
    (greedy,) = ours.generate_until(instances("generate_until", [("the cat", args)]))
    (tokens,) = generate(
        ours.model,
        [ours.tok_encode("the cat")],
        max_new_tokens=5,
        temperature=0,
        eos_id=ours.eot_token_id,
    )
    assert greedy == ours.tok_decode([t for t in tokens if t != ours.eot_token_id])
    sampled = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0}
    outs = ours.generate_until(instances("generate_until", [("the cat", sampled)] * 4))
    assert len(outs) == 4  # sampling runs; rows may differ


# Errors -----------------------------------------------------------------------------------------
def test_bad_task_name(ours):
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['no_such_task'\]"):
        run_tasks(ours, ["no_such_task"])


def test_missing_data_file(ours, tmp_path):
    text = (bundled_tasks()["llama_dist_mc"]).read_text()
    (tmp_path / "mine.yaml").write_text(text.replace("llama_dist_mc.jsonl", "absent.jsonl"))
    with pytest.raises(ValueError, match=r"task 'llama_dist_mc': data file .*absent.jsonl"):
        run_tasks(ours, [str(tmp_path / "mine.yaml")])


def test_checkpoint_without_tokenizer(files):
    with pytest.raises(ValueError, match="has no tokenizer.model and no tokenizer was given"):
        LlamaDistLM(checkpoint=str(files["ckpt"]), device="cpu")


# Command line -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_runs_bundled_task(files, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, *harness_cli(files, ["llama_dist_mc"], out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = list(out.rglob("results*.json"))
    assert written, result.stdout[-2000:]
    results = json.loads(written[0].read_text())["results"]
    assert "acc,none" in results["llama_dist_mc"]


# The evaluation job (launch/evaluate.py) ----------------------------------------------------------
def test_evaluate_job_writes_results_into_run_folder(files, ours, tmp_path):
    from llama_dist.config import EvaluateJobConfig
    from llama_dist.evaluation.job import evaluate_checkpoint

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(files["ckpt"], checkpoints / "step-5")
    cfg = EvaluateJobConfig(
        checkpoint=str(checkpoints / "step-5"),
        tokenizer=str(files["tokenizer"]),
        tasks=["llama_dist_mc"],
        device="cpu",
    )
    evaluate_checkpoint(cfg, tmp_path / "hydra")
    folder = tmp_path / "run" / "eval" / "step-5"
    table = (folder / "results.md").read_text()
    assert "llama_dist_mc" in table and "acc" in table
    written = json.loads((folder / "results.json").read_text())
    expected = run_tasks(ours, ["llama_dist_mc"])["results"]["llama_dist_mc"]["acc,none"]
    assert written["results"]["llama_dist_mc"]["acc,none"] == expected
    assert written["checkpoint"] == cfg.checkpoint and written["tasks"] == ["llama_dist_mc"]


@pytest.mark.slow
def test_evaluate_entry_point_bad_task_is_one_line(files, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "launch" / "evaluate.py"),
            f"checkpoint={files['ckpt']}",
            f"tokenizer={files['tokenizer']}",
            "tasks=[llama_dist_mc,no_such_task]",
            "device=cpu",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("evaluate: error:")]
    assert len(errors) == 1 and "no_such_task" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# Chat models ------------------------------------------------------------------------------------
DIALOG = [
    {"role": "system", "content": "answer in a few words"},
    {"role": "user", "content": "the cat sat on"},
    {"role": "assistant", "content": "a mat"},
    {"role": "user", "content": "and the dog"},
]


def test_chat_template_gives_the_sft_token_ids(ours):
    text = ours.apply_chat_template(DIALOG)
    assert ours.tok_encode(text) == encode_dialog(ours._tok, DIALOG).ids
    # A continuation scored after the chat context is the answer of the last segment, as SFT
    # trains it (the answer's tokens follow the prompt's within one bos-led segment).
    answered = [*DIALOG, {"role": "assistant", "content": "ran to the sun"}]
    context, continuation = ours._encode_pair(text, " ran to the sun")
    scored = context + continuation
    # (SFT's answer text ends with a space before eos, which the continuation has not.)
    assert encode_dialog(ours._tok, answered).ids[: len(scored)] == scored
    # The harness joins a chat request's answer without a space (target_delimiter ""): the
    # same tokens, not "]Paris" pieces the model never saw after [/INST].
    assert ours._encode_pair(text, "ran to the sun") == (context, continuation)
    # A gen_prefix: the assistant's start continues the last prompt, without eos.
    prefilled = ours.apply_chat_template(
        [*DIALOG, {"role": "assistant", "content": "it"}], add_generation_prompt=False
    )
    assert ours.tok_encode(prefilled) == ours.tok_encode(text + " it")
    with pytest.raises(ValueError, match="ends with an answer"):
        ours.apply_chat_template(DIALOG[:3])


def test_tasks_in_chat_format(ours):
    results = run_tasks(
        ours,
        ["llama_dist_mc", "llama_dist_gen"],
        log_samples=True,
        apply_chat_template=True,
        system_instruction="answer in a few words",
    )
    gen = results["samples"]["llama_dist_gen"][0]
    prompt = gen["arguments"][0][0]
    dialog = [
        {"role": "system", "content": "answer in a few words"},
        {"role": "user", "content": gen["doc"]["prompt"]},
    ]
    assert ours.tok_encode(prompt) == encode_dialog(ours._tok, dialog).ids
    mc = results["samples"]["llama_dist_mc"][0]
    context, continuation = mc["arguments"][0]
    dialog[1]["content"] = mc["doc"]["question"]
    assert ours.tok_encode(context) == encode_dialog(ours._tok, dialog).ids
    # Each choice is scored as the answer SFT would train: its tokens after the prompt's.
    context_ids, choice_ids = ours._encode_pair(context, continuation)
    answered = [*dialog, {"role": "assistant", "content": continuation}]
    assert encode_dialog(ours._tok, answered).ids[: len(context_ids + choice_ids)] == (
        context_ids + choice_ids
    )
    assert 0 <= results["results"]["llama_dist_mc"]["acc,none"] <= 1


def test_only_rank_0_of_the_harness_command_line_writes():
    from llama_dist.evaluation.__main__ import args_for_rank

    args = [
        "--model",
        "llama_dist",
        "--output_path",
        "out",
        "--log_samples",
        "--wandb_args",
        "project=x",
        "name=y",
        "--tasks",
        "llama_dist_mc",
        "-o=out2",
    ]
    assert args_for_rank(args, 0) == args
    assert args_for_rank(args, 3) == ["--model", "llama_dist", "--tasks", "llama_dist_mc"]
