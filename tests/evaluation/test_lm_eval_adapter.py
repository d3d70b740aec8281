"""The lm-eval adapter against the harness's own HF model on the same tiny model, in one process.

A tiny Llama is saved as a llama_dist checkpoint and exported to HF; `LlamaDistLM` reads the
checkpoint, `lm_eval.models.huggingface.HFLM` the HF folder. Both tokenize with the same
SentencePiece model (HFLM through transformers' sentencepiece tokenizer, checked to give the
same ids on every text used) and add bos, so their requests are the same token ids:
per-request loglikelihoods agree to 1e-4, accuracies and greedy generations exactly.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the eval extra (pip install -e '.[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend  # noqa: E402

from llama_dist.checkpoint import save_model_checkpoint  # noqa: E402
from llama_dist.evaluation import LlamaDistLM, bundled_tasks, run_tasks  # noqa: E402
from llama_dist.generate import generate  # noqa: E402
from llama_dist.models import Llama, LlamaConfig  # noqa: E402
from llama_dist.models.hf_adapter import save_hf_folder  # noqa: E402
from llama_dist.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4
MAX_SEQ_LEN = 64
WORDS = "the cat sat on a mat and dog ran to big red sun in sky we see it now".split()


class SentencePieceHFTokenizer(SentencePieceBackend):
    """transformers' tokenizer over the SentencePiece file, bos added, decoding through
    sentencepiece itself (the generic decode joins pieces and strips spaces differently)."""

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        # sentencepiece drops control pieces; HF writes them out unless skipped (HFLM's eos
        # stop string is the decoded eos, which must not be empty).
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        special = set(self.all_special_ids)
        text, run = "", []
        for i in ids:
            if i in special:
                text += self.sp_model.decode(run) + (
                    "" if skip_special_tokens else self.sp_model.id_to_piece(i)
                )
                run = []
            else:
                run.append(i)
        return text + self.sp_model.decode(run)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(300)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    tokenizer = train_tokenizer(
        [root / "corpus.txt"], root / "tokenizer.model", vocab_size=300, num_threads=1
    )
    cfg = LlamaConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=300,
        multiple_of=16,
        max_seq_len=MAX_SEQ_LEN,
    ).validate()
    model = Llama(cfg)
    model.init_weights(3)
    with torch.no_grad():
        # At the init scale every token is nearly equally likely; larger weights give the
        # model preferences, so accuracy and greedy tokens depend on the logits.
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.mul_(4.0)
    save_model_checkpoint(root / "ckpt", model.state_dict(), cfg)
    save_hf_folder(model.state_dict(), cfg, root / "hf")
    return {"root": root, "tokenizer": tokenizer, "ckpt": root / "ckpt", "hf": root / "hf"}


@pytest.fixture(scope="module")
def ours(files) -> LlamaDistLM:
    return LlamaDistLM(
        checkpoint=str(files["ckpt"]),
        tokenizer=str(files["tokenizer"]),
        batch_size=3,
        device="cpu",
    )


@pytest.fixture(scope="module")
def hf_tokenizer(files) -> SentencePieceHFTokenizer:
    return SentencePieceHFTokenizer(
        vocab_file=str(files["tokenizer"]),
        legacy=True,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        special_tokens_pattern="bos",
    )


@pytest.fixture(scope="module")
def theirs(files, hf_tokenizer) -> HFLM:
    model = AutoModelForCausalLM.from_pretrained(files["hf"], dtype=torch.float32).eval()
    return HFLM(
        pretrained=model,
        tokenizer=hf_tokenizer,
        batch_size=3,
        max_length=MAX_SEQ_LEN,
        add_bos_token=True,
        device="cpu",
    )


def _task_texts() -> list[str]:
    """Every context and context + continuation of the bundled tasks' data."""
    data = bundled_tasks()["llama_dist_mc"].parent / "data"
    texts = []
    for name in ("llama_dist_mc.jsonl", "llama_dist_gen.jsonl"):
        for line in (data / name).read_text().splitlines():
            doc = json.loads(line)
            if "choices" in doc:
                texts += [doc["question"]] + [f"{doc['question']} {c}" for c in doc["choices"]]
            else:
                texts += [doc["prompt"], doc["prompt"] + doc["answer"]]
    return texts


LL_REQUESTS = [
    ("the cat sat on a", " mat"),
    ("the cat sat on a", " mat and a dog ran to the sun"),
    ("", "the dog"),  # empty context: the prefix token (bos) stands in
    ("we see it ", "now"),  # trailing space moves into the continuation
    (" ".join(["the big red sun in the sky"] * 12), " and we see it"),  # longer than the window
]
ROLLING = ["the cat sat on a mat", " ".join(["we see the big red sun in the sky now"] * 10)]


def _instances(kind: str, args_list) -> list[Instance]:
    return [
        Instance(request_type=kind, doc={}, arguments=args, idx=i)
        for i, args in enumerate(args_list)
    ]


def test_both_sides_tokenize_alike(files, hf_tokenizer):
    sp = Tokenizer(files["tokenizer"])
    texts = _task_texts() + [c + x for c, x in LL_REQUESTS] + ROLLING
    for text in texts:
        assert hf_tokenizer.encode(text) == sp.encode(text, bos=True), text
        ids = sp.encode(text, bos=False)
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(ids)


def test_loglikelihood_matches_hflm(ours, theirs):
    mine = ours.loglikelihood(_instances("loglikelihood", LL_REQUESTS))
    ref = theirs.loglikelihood(_instances("loglikelihood", LL_REQUESTS))
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
    requests = _instances("loglikelihood", LL_REQUESTS)
    for (a, ga), (b, gb) in zip(
        one.loglikelihood(requests), ours.loglikelihood(requests), strict=True
    ):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_hf_folder_with_its_tokenizer_reads_the_same_model(files, ours, tmp_path):
    # An HF folder that carries its tokenizer.model needs no tokenizer argument.
    shutil.copytree(files["hf"], tmp_path / "hf")
    shutil.copy(files["tokenizer"], tmp_path / "hf" / "tokenizer.model")
    from_hf = LlamaDistLM(checkpoint=str(tmp_path / "hf"), device="cpu")
    requests = _instances("loglikelihood", LL_REQUESTS)
    for (a, ga), (b, gb) in zip(
        from_hf.loglikelihood(requests), ours.loglikelihood(requests), strict=True
    ):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_loglikelihood_rolling_matches_hflm(ours, theirs):
    requests = _instances("loglikelihood_rolling", [(s,) for s in ROLLING])
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


def _per_sample(results, task: str) -> list:
    return [
        (
            s["doc_id"],
            [
                list(map(float, r)) if isinstance(r, (list, tuple)) else r
                for r in s["filtered_resps"]
            ],
        )
        for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])
    ]


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
        _per_sample(mine, "llama_dist_mc"),
        _per_sample(ref, "llama_dist_mc"),
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
        _per_sample(mine, "llama_dist_gen"),
        _per_sample(ref, "llama_dist_gen"),
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
    (greedy,) = ours.generate_until(_instances("generate_until", [("the cat", args)]))
    (tokens,) = generate(
        ours.model,
        [ours.tok_encode("the cat")],
        max_new_tokens=5,
        temperature=0,
        eos_id=ours.eot_token_id,
    )
    assert greedy == ours.tok_decode([t for t in tokens if t != ours.eot_token_id])
    sampled = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0}
    outs = ours.generate_until(_instances("generate_until", [("the cat", sampled)] * 4))
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
        [
            sys.executable,
            "-m",
            "llama_dist.evaluation",
            "--model",
            "llama_dist",
            "--model_args",
            f"checkpoint={files['ckpt']},tokenizer={files['tokenizer']}",
            "--tasks",
            "llama_dist_mc",
            "--device",
            "cpu",
            "--output_path",
            str(out),
        ],
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
