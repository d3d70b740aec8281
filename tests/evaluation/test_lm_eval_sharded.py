"""The lm-eval adapter on 2 gloo ranks, FSDP and TP, against the harness's HF model in one
process (the same tiny model and requests as test_lm_eval_adapter.py).

Every rank runs the harness on all requests; the adapter deals them over the data-parallel
ranks and gathers the results. The requests are chosen so that the ranks' shares differ in
size (FSDP: one rank runs a placeholder forward with the other's last batch) and their
generations stop at different steps (the ranks keep stepping together). Every rank must
return the same results, and those must equal HFLM's: loglikelihoods to 1e-4, greedy flags,
accuracies and generations exactly. No rank holds the whole model.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import torch.distributed as dist
from eval_helpers import (
    ATOL,
    LL_REQUESTS,
    REPO_ROOT,
    ROLLING,
    harness_cli,
    instances,
    per_sample,
)
from torch.distributed.tensor import DTensor

from llama_dist.checkpoint.init import load_initial_weights, source_config
from llama_dist.evaluation import LlamaDistLM, run_tasks
from llama_dist.parallel import ParallelConfig, build_llama, build_mesh
from llama_dist.testing.distributed import run_distributed, torchrun_command
from llama_dist.tokenizer import Tokenizer

# Greedy generations of different lengths: stop strings met early or late, or never.
GEN_REQUESTS = [
    ("the cat sat", {"until": ["."], "max_gen_toks": 12, "do_sample": False}),
    ("we see", {"until": ["sun"], "max_gen_toks": 12, "do_sample": False}),
    ("the big red", {"until": [], "max_gen_toks": 7, "do_sample": False}),
    ("a dog ran to the", {"until": ["\n", "mat"], "max_gen_toks": 12, "do_sample": False}),
    ("it", {"until": ["."], "max_gen_toks": 12, "do_sample": False}),
]
TASKS = ["llama_dist_mc", "llama_dist_gen"]


def _tasks_summary(results) -> dict:
    return {
        "acc": results["results"]["llama_dist_mc"]["acc,none"],
        "exact_match": results["results"]["llama_dist_gen"]["exact_match,none"],
        "mc": per_sample(results, "llama_dist_mc"),
        "gen": per_sample(results, "llama_dist_gen"),
    }


def _training_layout(checkpoint: str, tokenizer: str) -> LlamaDistLM:
    """The model as pretraining holds it at tp 2: sequence and loss parallelism on."""
    parallel = ParallelConfig(tp=2).validate(2, source_config(checkpoint))
    mesh = build_mesh(parallel, device="cpu")
    model = build_llama(source_config(checkpoint), parallel, mesh, device=torch.device("cpu"))
    load_initial_weights(model, checkpoint)
    return LlamaDistLM.from_model(
        model, Tokenizer(tokenizer), mesh=mesh, sequence_parallel=True, batch_size=2
    )


def _evaluate_sharded(checkpoint: str, tokenizer: str, layout: str) -> dict:
    if layout == "tp2-sp":
        lm = _training_layout(checkpoint, tokenizer)
    else:
        tp, replicas = {"fsdp2": (1, 1), "tp2": (2, 1), "hsdp2": (1, 2)}[layout]
        lm = LlamaDistLM(
            checkpoint=checkpoint, tokenizer=tokenizer, batch_size=2, tp=tp, dp_replicate=replicas
        )
    params = list(lm.model.parameters())
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    out = {
        "held_fraction": held / sum(p.numel() for p in params),
        "ll": lm.loglikelihood(instances("loglikelihood", LL_REQUESTS)),
        "rolling": lm.loglikelihood_rolling(
            instances("loglikelihood_rolling", [(s,) for s in ROLLING])
        ),
        "gen": lm.generate_until(instances("generate_until", GEN_REQUESTS)),
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {k: v for k, v in out.items() if k != "held_fraction"})
    assert all(other == everyone[0] for other in everyone), "ranks returned different results"
    # The harness returns its results on the first process of a node only, as with TP launchers.
    results = run_tasks(lm, TASKS, log_samples=True)
    assert (results is None) == (dist.get_rank() != 0)
    if results is not None:
        out["tasks"] = _tasks_summary(results)
    return out


@pytest.fixture(scope="module")
def reference(ours, theirs) -> dict:
    theirs.add_bos_token = False  # see test_loglikelihood_rolling_matches_hflm
    try:
        rolling = theirs.loglikelihood_rolling(
            instances("loglikelihood_rolling", [(s,) for s in ROLLING])
        )
    finally:
        theirs.add_bos_token = True
    return {
        "ll": theirs.loglikelihood(instances("loglikelihood", LL_REQUESTS)),
        "rolling": rolling,
        "gen": theirs.generate_until(instances("generate_until", GEN_REQUESTS)),
        "gen_ours": ours.generate_until(instances("generate_until", GEN_REQUESTS)),
        "tasks": _tasks_summary(run_tasks(theirs, TASKS, log_samples=True)),
    }


@pytest.mark.parametrize("layout", ["fsdp2", "tp2", "tp2-sp", "hsdp2"])
def test_two_ranks_match_hflm(files, reference, layout):
    """fsdp2, tp2: a checkpoint read by the adapter; tp2-sp: the model as the pretraining
    loop holds it (`LlamaDistLM.from_model`), whose logits come vocab-sharded, whose inputs
    are padded to a multiple of tp, and which decodes through a copy without sequence
    parallelism; hsdp2: dp_replicate=2, the requests dealt over the replicas."""
    got = run_distributed(_evaluate_sharded, 2, str(files["ckpt"]), str(files["tokenizer"]), layout)
    if layout == "hsdp2":
        # Two replicas of one shard each: every rank holds the whole (tiny) model.
        assert got["held_fraction"] == 1
    else:
        # FSDP holds half of every parameter; TP all but the norms' share of the replicated
        # ones.
        assert got["held_fraction"] < 0.6
    for (a, greedy_a), (b, greedy_b) in zip(got["ll"], reference["ll"], strict=True):
        assert a == pytest.approx(b, abs=ATOL) and greedy_a == greedy_b
    assert got["rolling"] == pytest.approx(reference["rolling"], abs=ATOL)
    assert got["gen"] == reference["gen"] == reference["gen_ours"]
    # Generations end at different lengths (so ranks finished at different steps).
    assert len({len(text) for text in got["gen"]}) > 2
    tasks, ref = got["tasks"], reference["tasks"]
    assert tasks["acc"] == ref["acc"] and tasks["exact_match"] == ref["exact_match"]
    assert tasks["gen"] == ref["gen"]
    for (doc_a, resps_a), (doc_b, resps_b) in zip(tasks["mc"], ref["mc"], strict=True):
        assert doc_a == doc_b
        for x, y in zip(resps_a, resps_b, strict=True):
            assert x[0] == pytest.approx(y[0], abs=ATOL) and x[1] == y[1]


@pytest.mark.slow
def test_evaluate_entry_point_under_torchrun(files, ours, tmp_path):
    """`torchrun --nproc_per_node 2 launch/evaluate.py ... tp=2`: one results table, written by
    the first rank, with the scores of the one-process evaluation."""
    out = tmp_path / "out"
    result = subprocess.run(
        [
            *torchrun_command(2),
            str(REPO_ROOT / "launch" / "evaluate.py"),
            f"checkpoint={files['ckpt']}",
            f"tokenizer={files['tokenizer']}",
            f"tasks=[{','.join(TASKS)}]",
            "device=cpu",
            "tp=2",
            f"out_dir={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("evaluate: wrote") == 1
    written = json.loads((out / "results.json").read_text())
    assert written["world_size"] == 2 and written["tp"] == 2
    expected = run_tasks(ours, TASKS)["results"]
    for task in TASKS:
        for metric in ("acc,none", "exact_match,none"):
            if metric in expected[task]:
                assert written["results"][task][metric] == expected[task][metric]


@pytest.mark.slow
def test_harness_command_line_under_torchrun(files, ours, tmp_path):
    """`torchrun --nproc_per_node 2 -m llama_dist.evaluation --model llama_dist --model_args
    ...,tp=2`: the harness's own command line on a tp-sharded model; only the first rank
    writes results, and they are the one-process scores."""
    out = tmp_path / "out"
    result = subprocess.run(
        [*torchrun_command(2), *harness_cli(files, TASKS, out, ",tp=2")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = list(out.rglob("results*.json"))
    assert len(written) == 1, written
    results = json.loads(written[0].read_text())["results"]
    expected = run_tasks(ours, TASKS)["results"]
    assert results["llama_dist_mc"]["acc,none"] == expected["llama_dist_mc"]["acc,none"]
    assert (
        results["llama_dist_gen"]["exact_match,none"]
        == expected["llama_dist_gen"]["exact_match,none"]
    )
