"""Harness tasks during pretraining (`harness.tasks`): on 2 ranks with tensor, sequence and
loss parallelism, the tasks run at step 0, at each validation and at the end; their metrics
land in metrics.jsonl (kind "harness") and in loss_curve.png; the scores at the last step are
those of the final checkpoint evaluated in one process; and the run trains exactly as it
does without the evaluation."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import WORDS
from hydra import compose, initialize_config_dir

from llama_dist.config import HarnessConfig, JobConfig, register_configs, to_job_config
from llama_dist.data.prepare import prepare_data
from llama_dist.evaluation import LlamaDistLM, run_tasks
from llama_dist.evaluation.periodic import check_harness_tasks, flat_metrics, kept_rng_state
from llama_dist.metrics.logger import harness_curves, read_metrics
from llama_dist.testing.distributed import run_distributed
from llama_dist.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["llama_dist_mc", "llama_dist_gen"]


def _job(data: Path, tokenizer: Path, *overrides: str) -> JobConfig:
    register_configs()
    base = [
        "model=debug",
        f"data.paths=[{data}]",
        f"tokenizer={tokenizer}",
        "data.seq_len=32",
        "data.valid_fraction=0.1",
        "train.global_batch_tokens=256",
        "train.micro_batch=2",
        "train.steps=4",
        "train.log_every=1",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.wandb=false",
        "train.device=cpu",
        "optim.warmup_steps=1",
        "optim.lr=3e-3",
        "checkpoint.every=100",
        "sample.prompts=[]",
        "parallel.tp=2",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_job_config(compose("pretrain", overrides=[*base, *overrides]))


def _two_runs(with_harness: JobConfig, without: JobConfig, tmp: str) -> None:
    pretrain(copy.deepcopy(with_harness), Path(tmp) / "with")
    pretrain(copy.deepcopy(without), Path(tmp) / "without")


@pytest.fixture(scope="module")
def data(files, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("periodic")
    rng = random.Random(1)
    paragraphs = [
        "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(3))
        for _ in range(120)
    ]
    (root / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n")
    prepare_data(
        [root / "corpus.txt"],
        root / "corpus",
        files["tokenizer"],
        workers=1,
        split="paragraph",
        progress=False,
    )
    return root / "corpus"


def test_periodic_evaluation_during_pretraining(files, data, tmp_path):
    with_harness = _job(data, files["tokenizer"], f"harness.tasks=[{','.join(TASKS)}]")
    without = _job(data, files["tokenizer"])
    run_distributed(_two_runs, 2, with_harness, without, str(tmp_path))

    records = read_metrics(tmp_path / "with")
    rows = [r for r in records if r["kind"] == "harness"]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:
        assert {"llama_dist_mc/acc", "llama_dist_mc/acc_norm", "llama_dist_gen/exact_match"} <= set(
            row
        )
    assert set(harness_curves(records)) >= {"llama_dist_mc/acc", "llama_dist_gen/exact_match"}
    assert (tmp_path / "with" / "loss_curve.png").is_file()

    # The last scores are the final checkpoint's, evaluated on one process.
    final = LlamaDistLM(
        checkpoint=str(tmp_path / "with" / "checkpoints"),
        tokenizer=str(files["tokenizer"]),
        device="cpu",
        max_gen_toks=with_harness.harness.max_gen_toks,
        seed=with_harness.harness.seed,
    )
    expected = flat_metrics(run_tasks(final, TASKS, seed=with_harness.harness.seed))
    assert {k: rows[-1][k] for k in expected} == pytest.approx(expected, abs=1e-9)

    # The evaluation changes nothing in training: the same losses, bit for bit.
    def losses(run: str) -> dict[int, float]:
        return {
            r["step"]: r["loss"] for r in read_metrics(tmp_path / run) if r["kind"] != "harness"
        }

    assert losses("with") == losses("without")
    assert not [r for r in read_metrics(tmp_path / "without") if r["kind"] == "harness"]


def test_bad_harness_settings_fail_before_launch(files, data, tmp_path):
    with pytest.raises(ValueError, match=r"harness.tasks: unknown task\(s\) \['no_such_task'\]"):
        check_harness_tasks(HarnessConfig(tasks=["llama_dist_mc", "no_such_task"]))
    one = "parallel.tp=1"
    cfg = _job(data, files["tokenizer"], one, "harness.tasks=[llama_dist_mc]", "harness.every=3")
    with pytest.raises(ValueError, match="harness.every=3 is not a multiple of train.eval_every"):
        pretrain(cfg, tmp_path / "run")
    for bad, message in [
        ("harness.max_gen_toks=512", "harness.max_gen_toks=512 leaves no room for a prompt"),
        ("harness.num_fewshot=-1", "harness.num_fewshot=-1 must be >= 0"),
        ("train.eval_every=0", None),
    ]:
        overrides = [one, "harness.tasks=[llama_dist_mc]", bad]
        if message is None:  # every set, but validation only at the end
            overrides.append("harness.every=2")
            message = "harness.every=2 with train.eval_every=0"
        with pytest.raises(ValueError, match=message):
            pretrain(_job(data, files["tokenizer"], *overrides), tmp_path / "run")
    cfg = _job(data, files["tokenizer"], one, "harness.tasks=[llama_dist_mc]", "tokenizer=null")
    with pytest.raises(ValueError, match="harness.tasks needs the model's tokenizer"):
        pretrain(cfg, tmp_path / "run")
    cfg = _job(data, files["tokenizer"], one, "harness.tasks=[llama_dist_mc,no_such_task]")
    with pytest.raises(ValueError, match=r"harness.tasks: unknown task\(s\) \['no_such_task'\]"):
        pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_the_run_draws_after_an_evaluation_what_it_draws_without_one():
    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    without = draws()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    with kept_rng_state(torch.device("cpu")):
        random.seed(0), np.random.seed(0), torch.manual_seed(0)  # as simple_evaluate does
        inside = draws()
    assert draws() == without != inside
