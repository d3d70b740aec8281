"""The recipe's chain: stages connected by their checkpoints, the paper's RLHF schedule, done
stages skipped on a rerun, a stage cut short rerun, and the Slurm dependency chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_dist.recipe import DONE_FILE, RecipeConfig, plan_stages, run_chain, slurm_script


def config(tmp_path: Path, **fields) -> RecipeConfig:
    cfg = RecipeConfig(run_dir=str(tmp_path / "run"), tokenizer="tok.model", **fields)
    return cfg


def overrides(stage) -> dict[str, str]:
    return dict(o.split("=", 1) for o in stage.overrides)


def test_the_paper_schedule_chains_each_version_from_the_newest_model(tmp_path):
    stages = plan_stages(config(tmp_path, versions=3, ppo_from=2))
    by_name = {s.name: s for s in stages}
    assert [s.name for s in stages] == [
        "pretrain",
        "sft",
        "helpfulness-rm",
        "safety-rm",
        "rs-v1",
        "rs-v2",
        "ppo-v2",
        "rs-v3",
        "ppo-v3",
        "gatt",
        "context-distillation",
        "evaluation",
    ]
    run = tmp_path / "run"
    assert overrides(by_name["sft"])["init_from"] == str(run / "pretrain" / "checkpoints")
    for rm in ("helpfulness-rm", "safety-rm"):
        assert overrides(by_name[rm])["init_from"] == str(run / "sft" / "checkpoints")
    assert by_name["safety-rm"].config_name == "reward_safety"
    rs = {k: overrides(by_name[f"rs-v{k}"]) for k in (1, 2, 3)}
    # One rejection-sampling folder, iteration k: version k pools the kept sets of 1..k-1.
    assert {r["hydra.run.dir"] for r in rs.values()} == {str(run / "rejection-sampling")}
    assert [r["iteration"] for r in rs.values()] == ["1", "2", "3"]
    assert rs[1]["policy"] == str(run / "sft" / "checkpoints")
    assert rs[2]["policy"] == str(run / "rejection-sampling" / "iter-1" / "sft" / "checkpoints")
    # From ppo_from on, PPO starts from the version's rejection-sampling model, and the next
    # version samples from PPO's.
    ppo2 = overrides(by_name["ppo-v2"])
    assert ppo2["policy"] == str(run / "rejection-sampling" / "iter-2" / "sft" / "checkpoints")
    assert ppo2["value_from"] == str(run / "helpfulness-rm" / "checkpoints")
    assert ppo2["scorer.kind"] == "safety_gated"
    assert rs[3]["policy"] == str(run / "ppo-v2" / "checkpoints")
    assert overrides(by_name["gatt"])["policy"] == str(run / "ppo-v3" / "checkpoints")
    evaluation = overrides(by_name["evaluation"])
    assert evaluation["names"] == "[SFT,V1,V2,V3,GAtt,distilled]"
    assert evaluation["checkpoints"].count("checkpoints") == 6


def test_rejection_sampling_alone_and_a_public_starting_point(tmp_path):
    stages = plan_stages(
        config(
            tmp_path,
            stages=["sft", "helpfulness_rm", "safety_rm", "rlhf"],
            pretrained="/models/llama-2-7b-hf",
            versions=2,
            ppo_from=None,
        )
    )
    assert [s.name for s in stages] == ["sft", "helpfulness-rm", "safety-rm", "rs-v1", "rs-v2"]
    assert overrides(stages[0])["init_from"] == "/models/llama-2-7b-hf"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tokenizer": None}, "tokenizer is not set"),
        ({"stages": ["sft", "dpo"]}, "['dpo'] are not stages"),
        ({"stages": ["sft"]}, "set pretrained=CHECKPOINT"),
        ({"versions": 2, "ppo_from": 3}, "ppo_from=3 must be a version in 1..2"),
        ({"stages": ["pretrain", "sft", "rlhf"]}, "keep helpfulness_rm and safety_rm"),
        ({"sft": ["init_from=/elsewhere"]}, "sets init_from, which the chain sets itself"),
        ({"ppo": ["hydra.run.dir=/x"]}, "remove it from recipe.ppo"),
        ({"action": "go"}, "action='go' must be run, print or slurm"),
    ],
)
def test_bad_recipes_are_refused_before_anything_runs(tmp_path, fields, message):
    cfg = config(tmp_path)
    for key, value in fields.items():
        setattr(cfg, key, value)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        run_chain(cfg)
    assert not (tmp_path / "run").exists()


FAKE_LAUNCHER = """\
import json, os, sys
from pathlib import Path
# python -m llama_dist.torchrun --standalone --nproc_per_node N SCRIPT [--config-name C] ...
args = sys.argv[sys.argv.index("--nproc_per_node") + 2 :]
script, overrides = sys.argv[sys.argv.index("--nproc_per_node") + 2], args[1:]
values = dict(o.split("=", 1) for o in overrides if "=" in o)
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps([script, overrides]) + "\\n")
if os.environ.get("STOP_AT") == values.get("hydra.run.dir", "").rsplit("/", 1)[-1] + script:
    sys.exit(3)
"""


def test_a_rerun_skips_done_stages_and_reruns_the_one_cut_short(tmp_path):
    fake = tmp_path / "fake_python.py"
    fake.write_text(FAKE_LAUNCHER)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {fake} "$@"\n')
    python.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    cfg = config(tmp_path, versions=2, ppo_from=2)
    # The first attempt is stopped (exit 3) in PPO of V2, as by a signal.
    os.environ.update(CALLS=str(calls), STOP_AT="ppo-v2launch/ppo.py")
    try:
        assert run_chain(cfg, python=str(python)) == 3
        first = [json.loads(line) for line in calls.read_text().splitlines()]
        assert [c[0] for c in first][-2:] == ["launch/rejection_sampling.py", "launch/ppo.py"]
        stages = plan_stages(cfg)
        done = [s.name for s in stages if (s.folder / DONE_FILE).is_file()]
        assert done == ["pretrain", "sft", "helpfulness-rm", "safety-rm", "rs-v1", "rs-v2"]
        os.environ["STOP_AT"] = ""
        calls.unlink()
        assert run_chain(cfg, python=str(python)) == 0
        second = [json.loads(line) for line in calls.read_text().splitlines()]
        # Only the stage cut short and those after it ran, with the same command as before.
        assert [c[0] for c in second] == [
            "launch/ppo.py",
            "launch/gatt.py",
            "launch/context_distillation.py",
            "launch/safety_eval.py",
        ]
        assert second[0] == first[-1]
        overview = (tmp_path / "run" / "overview.md").read_text()
        assert "## ppo-v2" in overview and "## evaluation" in overview
        # A done stage whose overrides changed is an error before anything runs.
        cfg.sft = ["train.steps=99"]
        calls.unlink()
        with pytest.raises(ValueError, match=r"stage sft is done .* changed \(train.steps=99\)"):
            run_chain(cfg, python=str(python))
        assert not calls.exists()
    finally:
        for key in ("CALLS", "STOP_AT"):
            os.environ.pop(key, None)


def test_the_slurm_chain_submits_each_stage_after_the_previous_one(tmp_path):
    cfg = config(tmp_path, versions=2, ppo_from=2)
    cfg.slurm.partition = "gpu"
    submit = slurm_script(cfg, out=tmp_path / "slurm")
    text = submit.read_text()
    scripts = sorted((tmp_path / "slurm").glob("*.sbatch"))
    assert len(scripts) == len(plan_stages(cfg)) == 10
    assert text.count("--dependency=afterok:$previous") == len(scripts)
    for path in [submit, *scripts]:
        subprocess.run(["bash", "-n", str(path)], check=True)
    ppo = next(p for p in scripts if p.name.endswith("ppo-v2.sbatch")).read_text()
    assert "#SBATCH --partition=gpu" in ppo and "run_stage launch/ppo.py" in ppo
    assert f"RUN_DIR={tmp_path / 'run' / 'ppo-v2'}" in ppo
    safety = next(p for p in scripts if p.name.endswith("safety-rm.sbatch")).read_text()
    assert "--config-name reward_safety" in safety
    # The marker a successful stage leaves is the one a local rerun reads.
    marker = ppo.split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0]
    assert json.loads(marker)["stage"] == "ppo-v2"


def test_a_mistyped_key_of_a_late_stage_is_refused_before_anything_runs(tmp_path):
    cfg = config(
        tmp_path,
        pretrain=["model=debug"],
        ppo=["ppo.iterations=4"],  # PPOJobConfig has `iterations`, not ppo.iterations
        prepare=["false"],  # would fail the chain if anything ran
    )
    with pytest.raises(ValueError, match=r"stage ppo-v2: .*ppo\.iterations"):
        run_chain(cfg, python=sys.executable)
    assert not (tmp_path / "run").exists()
