"""The Llama 2 recipe as one chain of stages, each a run of its own entry point.

    pretrain -> SFT -> Helpfulness RM, Safety RM -> RLHF V1..Vn -> GAtt
        -> safety context distillation -> evaluation -> overview

Every stage is the same command a user would type (`python -m llama_dist.torchrun ...
launch/<stage>.py <overrides>`), run into a folder of one run folder; the chain only adds the
overrides that connect it: each stage's checkpoint is the next one's starting point. The RLHF
part follows the paper's schedule (llama2.md, "Rejection sampling fine-tuning"): version k
rejection-samples from the newest model (iteration k of one rejection-sampling folder, so the
kept samples of earlier versions are pooled) and fine-tunes on the kept set; from version
`ppo_from` on, PPO then starts from that fine-tuned model, and its result is version k.

A stage that ends with exit 0 leaves `stage.done.json` (its command) in its folder, and a rerun
of the chain skips it; a stage cut short reruns with the same command and resumes from its own
checkpoints. A done stage whose command has changed is an error before anything runs. The
same chain becomes a Slurm dependency chain (`slurm_script`): one `sbatch` per stage, each
after the previous one succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("llama_dist.recipe")

DONE_FILE = "stage.done.json"
OVERVIEW_FILE = "overview.md"
# The stage kinds, in the order they run; `stages` picks among them.
KINDS = (
    "pretrain",
    "sft",
    "helpfulness_rm",
    "safety_rm",
    "rlhf",
    "gatt",
    "context_distillation",
    "evaluation",
)


@dataclass
class SlurmChainConfig:
    """`action=slurm`: the batch scripts of the chain (sbatch options of every stage)."""

    nodes: int = 1
    gpus_per_node: int = 8
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None


@dataclass
class RecipeConfig:
    """The whole recipe (conf/recipe.yaml). Each `<kind>` list holds that stage's own Hydra
    overrides (its data, steps, learning rate, ...); the chain adds the ones that connect the
    stages (run folders, checkpoints, tokenizer), and a stage's list may not set those."""

    run_dir: str = "runs/recipe"
    tokenizer: str | None = None  # tokenizer.model, shared by every stage (required)
    nproc_per_node: int = 2  # processes per stage (torchrun), on one node
    stages: list[str] = field(default_factory=lambda: list(KINDS))
    # A pretrained (or HF) checkpoint to fine-tune instead of a pretraining stage of our own.
    pretrained: str | None = None
    versions: int = 2  # RLHF versions V1..Vn
    ppo_from: int | None = 2  # the first version with PPO after rejection sampling (null: none)
    prepare: list[str] = field(default_factory=list)  # commands run first, e.g. data downloads
    pretrain: list[str] = field(default_factory=list)
    sft: list[str] = field(default_factory=list)
    helpfulness_rm: list[str] = field(default_factory=list)
    safety_rm: list[str] = field(default_factory=list)
    rejection_sampling: list[str] = field(default_factory=list)
    ppo: list[str] = field(default_factory=list)
    gatt: list[str] = field(default_factory=list)
    context_distillation: list[str] = field(default_factory=list)
    evaluation: list[str] = field(default_factory=list)
    # run: the stages not done yet; print: their commands only; slurm: write the batch
    # scripts of the chain (into run_dir/slurm) and print how to submit them.
    action: str = "run"
    slurm: SlurmChainConfig = field(default_factory=SlurmChainConfig)
    run_name: str = "recipe"


@dataclass(frozen=True)
class Stage:
    """One run of an entry point in the chain."""

    name: str  # unique, e.g. "rs-v2"; also its folder unless `folder` says otherwise
    script: str  # launch/<entry point>.py
    overrides: tuple[str, ...]  # the chain's (connecting) ones first, then the user's
    folder: Path  # holds stage.done.json; the run folder or below it
    output: Path | None = None  # the checkpoint folder it produces
    config_name: str | None = None  # --config-name, e.g. reward_safety

    def command(self, python: str, nproc_per_node: int) -> list[str]:
        if nproc_per_node == 1:
            launcher = [python, self.script]  # a world of one needs no launcher
        else:
            launcher = [python, "-m", "llama_dist.torchrun", "--standalone"]
            launcher += ["--nproc_per_node", str(nproc_per_node), self.script]
        if self.config_name:
            launcher += ["--config-name", self.config_name]
        return [*launcher, *self.overrides]


def _wired(keys: Sequence[str], user: Sequence[str], stage: str) -> None:
    """Refuse a user override of a key the chain sets: which one wins would be unclear."""
    for override in user:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in keys:
            raise ValueError(
                f"recipe: {stage}: {override!r} sets {key}, which the chain sets itself "
                f"(it connects the stages: {', '.join(keys)}); remove it from recipe.{stage}"
            )


def _stage(
    name: str,
    script: str,
    wiring: dict[str, str | Path],
    user: Sequence[str],
    *,
    folder: Path,
    kind: str,
    output: Path | None = None,
    config_name: str | None = None,
) -> Stage:
    _wired(list(wiring), user, kind)
    connecting = tuple(f"{k}={v}" for k, v in wiring.items())
    return Stage(name, script, connecting + tuple(user), folder, output, config_name)


def plan_stages(cfg: RecipeConfig) -> list[Stage]:
    """The chain's stages in order, with the overrides that connect them."""
    validate_recipe(cfg)
    run = Path(cfg.run_dir)
    tok = cfg.tokenizer
    on = set(cfg.stages)
    stages: list[Stage] = []

    def checkpoints(folder: Path) -> Path:
        return folder / "checkpoints"

    base: Path | str | None = cfg.pretrained
    if "pretrain" in on:
        folder = run / "pretrain"
        wiring = {"hydra.run.dir": folder, "tokenizer": tok}
        stages.append(
            _stage(
                "pretrain",
                "launch/pretrain.py",
                wiring,
                cfg.pretrain,
                folder=folder,
                kind="pretrain",
                output=checkpoints(folder),
            )
        )
        base = checkpoints(folder)
    sft_model = base
    if "sft" in on:
        folder = run / "sft"
        wiring = {"hydra.run.dir": folder, "tokenizer": tok, "init_from": base}
        stages.append(
            _stage(
                "sft",
                "launch/sft.py",
                wiring,
                cfg.sft,
                folder=folder,
                kind="sft",
                output=checkpoints(folder),
            )
        )
        sft_model = checkpoints(folder)
    rms: dict[str, Path] = {}
    for kind, config_name in (
        ("helpfulness_rm", "reward_helpfulness"),
        ("safety_rm", "reward_safety"),
    ):
        if kind not in on:
            continue
        folder = run / kind.replace("_", "-")
        wiring = {"hydra.run.dir": folder, "tokenizer": tok, "init_from": sft_model}
        stages.append(
            _stage(
                kind.replace("_", "-"),
                "launch/reward.py",
                wiring,
                getattr(cfg, kind),
                folder=folder,
                kind=kind,
                output=checkpoints(folder),
                config_name=config_name,
            )
        )
        rms[kind] = checkpoints(folder)

    def scorer() -> dict[str, str | Path]:
        if len(rms) < 2:
            raise ValueError(
                "recipe: the RLHF, distillation and evaluation stages score with both reward "
                "models; keep helpfulness_rm and safety_rm in recipe.stages"
            )
        return {
            "scorer.kind": "safety_gated",
            "scorer.helpfulness_rm": rms["helpfulness_rm"],
            "scorer.safety_rm": rms["safety_rm"],
        }

    policy = sft_model
    versions: list[tuple[str, Path | str | None]] = [("SFT", sft_model)]
    if "rlhf" in on:
        rs_run = run / "rejection-sampling"
        for k in range(1, cfg.versions + 1):
            wiring = {
                "hydra.run.dir": rs_run,
                "tokenizer": tok,
                "policy": policy,
                "iteration": str(k),
                **scorer(),
            }
            folder = rs_run / f"iter-{k}"
            stages.append(
                _stage(
                    f"rs-v{k}",
                    "launch/rejection_sampling.py",
                    wiring,
                    cfg.rejection_sampling,
                    folder=folder,
                    kind="rejection_sampling",
                    output=checkpoints(folder / "sft"),
                )
            )
            policy = checkpoints(folder / "sft")
            if cfg.ppo_from is not None and k >= cfg.ppo_from:
                folder = run / f"ppo-v{k}"
                wiring = {
                    "hydra.run.dir": folder,
                    "tokenizer": tok,
                    "policy": policy,
                    "value_from": rms["helpfulness_rm"],
                    **scorer(),
                }
                stages.append(
                    _stage(
                        f"ppo-v{k}",
                        "launch/ppo.py",
                        wiring,
                        cfg.ppo,
                        folder=folder,
                        kind="ppo",
                        output=checkpoints(folder),
                    )
                )
                policy = checkpoints(folder)
            versions.append((f"V{k}", policy))
    if "gatt" in on:
        folder = run / "gatt"
        wiring = {"hydra.run.dir": folder, "tokenizer": tok, "policy": policy}
        stages.append(
            _stage(
                "gatt",
                "launch/gatt.py",
                wiring,
                cfg.gatt,
                folder=folder,
                kind="gatt",
                output=checkpoints(folder / "sft"),
            )
        )
        policy = checkpoints(folder / "sft")
        versions.append(("GAtt", policy))
    if "context_distillation" in on:
        folder = run / "context-distillation"
        wiring = {
            "hydra.run.dir": folder,
            "tokenizer": tok,
            "policy": policy,
            "safety_rm": scorer()["scorer.safety_rm"],
        }
        stages.append(
            _stage(
                "context-distillation",
                "launch/context_distillation.py",
                wiring,
                cfg.context_distillation,
                folder=folder,
                kind="context_distillation",
                output=checkpoints(folder / "sft"),
            )
        )
        policy = checkpoints(folder / "sft")
        versions.append(("distilled", policy))
    if "evaluation" in on:
        folder = run / "evaluation"
        models = [(name, path) for name, path in versions if path is not None]
        wiring = {
            "hydra.run.dir": folder,
            "tokenizer": tok,
            "checkpoints": "[" + ",".join(str(p) for _, p in models) + "]",
            "names": "[" + ",".join(n for n, _ in models) + "]",
            "helpfulness_rm": scorer()["scorer.helpfulness_rm"],
            "safety_rm": scorer()["scorer.safety_rm"],
        }
        stages.append(
            _stage(
                "evaluation",
                "launch/safety_eval.py",
                wiring,
                cfg.evaluation,
                folder=folder,
                kind="evaluation",
            )
        )
    return stages


def validate_recipe(cfg: RecipeConfig) -> None:
    if not cfg.tokenizer:
        raise ValueError("recipe: tokenizer is not set; pass tokenizer=PATH/tokenizer.model")
    unknown = [s for s in cfg.stages if s not in KINDS]
    if unknown:
        raise ValueError(f"recipe: stages {unknown} are not stages; choose among {list(KINDS)}")
    if "pretrain" not in cfg.stages and not cfg.pretrained:
        raise ValueError(
            "recipe: without the pretrain stage, set pretrained=CHECKPOINT (ours or an HF "
            "folder) for SFT to start from"
        )
    if "pretrain" in cfg.stages and cfg.pretrained:
        raise ValueError("recipe: pretrained is set and pretrain is a stage; keep one of them")
    if cfg.versions < 1:
        raise ValueError(f"recipe: versions={cfg.versions} must be >= 1")
    if cfg.ppo_from is not None and not 1 <= cfg.ppo_from <= cfg.versions:
        raise ValueError(
            f"recipe: ppo_from={cfg.ppo_from} must be a version in 1..{cfg.versions}, or null "
            "for rejection sampling alone"
        )
    if cfg.action not in ("run", "print", "slurm"):
        raise ValueError(f"recipe: action={cfg.action!r} must be run, print or slurm")
    if cfg.nproc_per_node < 1:
        raise ValueError(f"recipe: nproc_per_node={cfg.nproc_per_node} must be >= 1")


# Running ---------------------------------------------------------------------------------
def done_record(stage: Stage) -> dict | None:
    path = stage.folder / DONE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to rerun {stage.name}") from e


def check_done_stages(stages: Sequence[Stage]) -> None:
    """Before anything runs: a done stage must have been run with the command it has now."""
    for stage in stages:
        record = done_record(stage)
        if record is not None and record["overrides"] != list(stage.overrides):
            before, now = set(record["overrides"]), set(stage.overrides)
            changed = sorted((now - before) | (before - now))
            raise ValueError(
                f"recipe: stage {stage.name} is done ({stage.folder / DONE_FILE}) but its "
                f"overrides changed ({', '.join(changed)}); restore them, or move "
                f"{stage.folder} and the folders of the stages after it away to run them again"
            )


def check_stage_configs(stages: Sequence[Stage], *, conf_dir: Path | None = None) -> None:
    """Before anything runs: every stage's overrides compose into its entry point's schema (a
    mistyped key of the last stage is found now, not hours later). Paths are not checked: the
    earlier stages write them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llama_dist.config import register_configs
    from llama_dist.config_keys import to_typed_config

    register_configs()
    conf_dir = conf_dir or Path(__file__).resolve().parents[2] / "conf"
    if not conf_dir.is_dir():
        return  # an installed package without the repository's conf/: the stages check
    hydra_was = GlobalHydra.instance().is_initialized()
    if hydra_was:
        return  # inside another Hydra app (a test's compose): leave its state alone
    for stage in stages:
        name = stage.config_name or Path(stage.script).stem
        overrides = [o for o in stage.overrides if not o.startswith("hydra.")]
        try:
            with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
                to_typed_config(compose(name, overrides=overrides))
        except Exception as e:  # noqa: BLE001 - Hydra's and the schema's errors alike
            raise ValueError(f"recipe: stage {stage.name}: {e}") from e


def _command_line(command: str, python: str) -> list[str]:
    """A prepare command's argv; a leading `python` is the interpreter running the recipe."""
    argv = shlex.split(command)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = python
    return argv


def run_chain(cfg: RecipeConfig, *, python: str = sys.executable, cwd: Path | None = None) -> int:
    """Run the stages not done yet, in order; returns the first failing stage's exit code
    (2: a mistake in its config, 3: stopped early, resumable by running the chain again)."""
    stages = plan_stages(cfg)
    check_done_stages(stages)
    check_stage_configs(stages)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    for command in cfg.prepare:
        log.info("recipe: prepare: %s", command)
        code = subprocess.call(_command_line(command, python), cwd=cwd)
        if code:
            log.error("recipe: prepare command failed (exit %d): %s", code, command)
            return code
    for stage in stages:
        if done_record(stage) is not None:
            log.info("recipe: %s is done (%s)", stage.name, stage.folder / DONE_FILE)
            continue
        command = stage.command(python, cfg.nproc_per_node)
        log.info("recipe: %s: %s", stage.name, shlex.join(command))
        started = time.time()
        code = subprocess.call(command, cwd=cwd)
        if code:
            log.error(
                "recipe: stage %s exited with %d; fix what it said and run the recipe again: "
                "done stages are skipped and %s resumes from its checkpoints",
                stage.name,
                code,
                stage.name,
            )
            return code
        stage.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "stage": stage.name,
            "overrides": list(stage.overrides),
            "seconds": round(time.time() - started, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (stage.folder / DONE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    write_overview(cfg, stages)
    return 0


def slurm_script(cfg: RecipeConfig, *, out: Path) -> Path:
    """Write one batch script per stage and `submit.sh`, which submits them as a chain
    (`--dependency=afterok`); returns submit.sh. Each batch script runs its stage through
    slurm/common.sh (`run_stage`) so signals, requeue and resume work as for pretraining."""
    stages = plan_stages(cfg)
    s = cfg.slurm
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "#!/bin/bash",
        "# The recipe as a Slurm dependency chain: each stage starts once the previous one",
        "# succeeded. Run from the repository root: bash " + str(out / "submit.sh"),
        "set -euo pipefail",
        "previous=",
    ]
    for i, stage in enumerate(stages, 1):
        script = out / f"{i:02d}-{stage.name}.sbatch"
        options = [
            f"--job-name={stage.name}",
            f"--nodes={s.nodes}",
            "--ntasks-per-node=1",
            f"--gpus-per-node={s.gpus_per_node}",
            "--exclusive",
            "--mem=0",
            f"--time={s.time}",
            "--signal=B:USR1@300",
            "--requeue",
            "--open-mode=append",
            "--output=slurm/logs/%x-%j.out",
        ]
        options += [f"--partition={s.partition}"] if s.partition else []
        options += [f"--account={s.account}"] if s.account else []
        config = f"--config-name {stage.config_name} " if stage.config_name else ""
        body = [
            "#!/bin/bash",
            *(f"#SBATCH {o}" for o in options),
            f"# Recipe stage {i} of {len(stages)}: {stage.name}",
            'source "${SLURM_SUBMIT_DIR:?submit with sbatch}/slurm/common.sh" || exit 1',
            f"RUN_DIR={shlex.quote(str(_run_dir(stage)))} run_stage {stage.script} "
            + config
            + " ".join(
                shlex.quote(o) for o in stage.overrides if not o.startswith("hydra.run.dir=")
            ),
            # Reached only when the stage succeeded (common.sh runs with set -e).
            f"cat > {shlex.quote(str(stage.folder / DONE_FILE))} <<'EOF'",
            json.dumps({"stage": stage.name, "overrides": list(stage.overrides)}, indent=1),
            "EOF",
        ]
        script.write_text("\n".join(body) + "\n")
        lines.append(
            f"previous=$(sbatch --parsable ${{previous:+--dependency=afterok:$previous}} {script})"
        )
        lines.append(f'echo "{stage.name}: job $previous"')
    submit = out / "submit.sh"
    submit.write_text("\n".join(lines) + "\n")
    submit.chmod(0o755)
    return submit


def _run_dir(stage: Stage) -> str:
    return next(o.split("=", 1)[1] for o in stage.overrides if o.startswith("hydra.run.dir="))


# The overview ----------------------------------------------------------------------------
REPORTS = ("reward_eval.md", "report.md", "adherence.md", "safety_eval.md", "win_rates.md")


def write_overview(cfg: RecipeConfig, stages: Sequence[Stage]) -> Path:
    """`overview.md` in the run folder: each stage's tables, plots and time."""
    run = Path(cfg.run_dir)
    parts = [f"# The recipe in {run}", ""]
    for stage in stages:
        record = done_record(stage) or {}
        parts.append(f"## {stage.name}")
        parts.append("")
        seconds = record.get("seconds")
        parts.append(f"`{stage.script}`" + (f", {seconds:.0f} s" if seconds is not None else ""))
        parts.append("")
        for name in REPORTS:
            report = stage.folder / name
            if report.is_file():
                parts += [report.read_text().strip(), ""]
        for png in sorted(stage.folder.glob("*.png")):
            parts += [f"![{png.stem}]({os.path.relpath(png, run)})", ""]
    out = run / OVERVIEW_FILE
    out.write_text("\n".join(parts) + "\n")
    return out


def run_recipe(cfg: RecipeConfig, *, python: str = sys.executable) -> int:
    """The entry point's work: run, print or write the chain as `cfg.action` says."""
    if cfg.action == "print":
        stages = plan_stages(cfg)
        for stage in stages:
            state = "done" if done_record(stage) is not None else "to run"
            print(
                f"# {stage.name} ({state})\n{shlex.join(stage.command(python, cfg.nproc_per_node))}"
            )
        return 0
    if cfg.action == "slurm":
        submit = slurm_script(cfg, out=Path(cfg.run_dir) / "slurm")
        print(f"batch scripts in {submit.parent}; submit the chain with: bash {submit}")
        return 0
    return run_chain(cfg, python=python)
