"""The recipe of conf/recipe.yaml, shortened, run for real: every stage a subprocess of its own
entry point (one process each), connected by their checkpoints, into one run folder.

Shortened means fewer steps, prompts and documents; the stages, the wiring, the data
preparation and the reports are those of `make recipe-demo`. A second run finds every stage
done and runs nothing; a changed done stage is refused before anything runs.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from llama_dist.recipe import DONE_FILE, RecipeConfig, plan_stages, run_chain

ROOT = Path(__file__).resolve().parents[1]
SHORTER = {
    "train.steps": "3",
    "sft.train.steps": "3",
    "train.eval_every": "0",
    "iterations": "2",
    "ppo.batch_prompts": "8",
    "ppo.minibatch_prompts": "8",
    "synthetic.n": "8",
    "eval.num_dialogs": "4",
    "eval.num_turns": "4",
    "num_turns": "4",
    "synthetic.turns": "4",
    "optim.warmup_steps": "1",
    "sft.optim.warmup_steps": "0",
}


def shorten(entries: list[str], data: Path) -> list[str]:
    out = []
    for entry in entries:
        entry = entry.replace("data/recipe_demo", str(data))
        key = entry.split("=", 1)[0]
        out.append(f"{key}={SHORTER[key]}" if key in SHORTER else entry)
    return out


def recipe(tmp: Path) -> RecipeConfig:
    ConfigStore.instance().store(name="recipe_schema", node=RecipeConfig)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg: RecipeConfig = OmegaConf.to_object(compose("recipe"))
    data = tmp / "data"
    cfg.run_dir = str(tmp / "run")
    cfg.tokenizer = str(data / "tokenizer.model")
    cfg.nproc_per_node = 1
    cfg.prepare = [
        f"python launch/prepare_recipe_demo.py --out {data} --documents 300 --pairs 48",
    ]
    for kind in (
        "pretrain",
        "sft",
        "helpfulness_rm",
        "safety_rm",
        "rejection_sampling",
        "ppo",
        "gatt",
        "context_distillation",
        "evaluation",
    ):
        setattr(cfg, kind, shorten(getattr(cfg, kind), data))
    cfg.rejection_sampling.append("sft.train.steps=2")
    cfg.context_distillation.append("sft.train.steps=2")
    cfg.gatt.append("sft.train.steps=2")
    return cfg


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    cfg = recipe(tmp)
    started = time.time()
    code = run_chain(cfg, python=sys.executable, cwd=ROOT)
    return cfg, code, time.time() - started


def test_the_shortened_chain_runs_every_stage_into_one_folder(chain):
    cfg, code, _ = chain
    assert code == 0
    run = Path(cfg.run_dir)
    stages = plan_stages(cfg)
    assert [s.name for s in stages] == [
        "pretrain",
        "sft",
        "helpfulness-rm",
        "safety-rm",
        "rs-v1",
        "rs-v2",
        "ppo-v2",
        "gatt",
        "context-distillation",
        "evaluation",
    ]
    for stage in stages:
        assert (stage.folder / DONE_FILE).is_file(), stage.name
        if stage.output is not None:
            assert list(stage.output.glob("step-*")), stage.name
    # Each version samples from the newest model; PPO starts from V2's fine-tuned policy.
    ppo = next(s for s in stages if s.name == "ppo-v2")
    assert (
        f"policy={run / 'rejection-sampling' / 'iter-2' / 'sft' / 'checkpoints'}" in ppo.overrides
    )
    # The reports of the stages, and the overview that collects them.
    assert (run / "gatt" / "adherence.md").is_file()
    assert (run / "context-distillation" / "report.md").is_file()
    evaluation = run / "evaluation"
    for name in ("safety_eval.md", "win_rates.md", "win_rates.png", "safety_eval.png"):
        assert (evaluation / name).is_file(), name
    versions = json.loads((evaluation / "safety_eval.json").read_text())
    names = {row["checkpoint"] for row in versions["rows"]}
    assert names == {"SFT", "V1", "V2", "GAtt", "distilled"}
    overview = (run / "overview.md").read_text()
    for stage in stages:
        assert f"## {stage.name}" in overview
    assert re.search(r"!\[win_rates\]\(evaluation/win_rates\.png\)", overview)


def test_a_second_run_skips_every_done_stage_and_a_changed_one_is_refused(chain, tmp_path):
    cfg, _, first = chain
    started = time.time()
    assert run_chain(cfg, python=sys.executable, cwd=ROOT) == 0
    assert time.time() - started < min(60, first / 2)  # only the data check reran
    changed = RecipeConfig(**{**cfg.__dict__, "sft": [*cfg.sft, "optim.lr=2e-3"]})
    with pytest.raises(ValueError, match=r"stage sft is done .* overrides changed"):
        run_chain(changed, python=sys.executable, cwd=ROOT)
