"""The pretraining job's pre-launch memory check (planner/launch_check.py).

Every Slurm template and every layout example of the README is composed as the launcher would
(its Hydra overrides, its world size, an 80 GB H100 named by parallel.gpu), validated, and its
per-GPU estimate must fit; grad_sync=auto must pick "every" exactly where "last" would not fit;
a job over the budget must fail before any process group exists, naming the biggest terms and
a layout that fits, unless parallel.memory_check=warn.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from llama_dist.config import register_configs, to_job_config, validate_job
from llama_dist.planner.hardware import GIB
from llama_dist.planner.launch_check import check_job_memory, estimate_job_memory

ROOT = Path(__file__).resolve().parents[2]
GPU = "h100-sxm"  # what the templates and the README's examples are written for


def job(overrides: list[str], world_size: int):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_job_config(
            compose("pretrain", overrides=[*overrides, f"parallel.gpu={GPU}", "train.steps=10000"])
        )
    model = validate_job(cfg, world_size)
    return cfg, model


def estimate(cfg, model, world_size: int):
    return estimate_job_memory(
        model,
        parallel=cfg.parallel,
        train=cfg.train,
        seq_len=cfg.data.seq_len,
        world_size=world_size,
        device_type="cpu",
        gpus_per_node=min(world_size, 8),
    )


def slurm_jobs() -> list[tuple[str, list[str], int]]:
    jobs = []
    for path in sorted((ROOT / "slurm").glob("*.sbatch")):
        text = path.read_text()
        nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
        gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
        line = next(ln for ln in text.splitlines() if ln.startswith("pretrain "))
        overrides = [w for w in shlex.split(line)[1:] if w != "$@"]
        jobs.append((path.name, overrides, nodes * gpus))
    return jobs


def readme_jobs() -> list[tuple[str, list[str], int]]:
    """The README's layout table: each GPU example's overrides and world size (a `...` for the
    launcher is one 8-GPU node; --nnodes multiplies)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| layout | example |") :].split("\n\n", 1)[0]
    jobs = []
    for row in table.splitlines()[2:]:
        name, example = row.split("|")[1].strip(), row.split("|")[2].strip()
        command = example.split("`")[1]
        if "launch/pretrain.py" not in command or "model=debug" in command:
            continue  # a fragment added to another example, or the CPU example
        launcher, overrides = command.split("launch/pretrain.py", 1)
        nproc = re.search(r"--nproc_per_node (\d+)", launcher)
        nnodes = re.search(r"--nnodes (\d+)", launcher)
        world = (int(nproc.group(1)) if nproc else 8) * (int(nnodes.group(1)) if nnodes else 1)
        jobs.append((name, overrides.split(), world))
    return jobs


def test_the_examples_are_found():
    assert {name for name, _, _ in slurm_jobs()} == {
        "llama7b.sbatch",
        "llama13b.sbatch",
        "llama34b.sbatch",
        "llama70b.sbatch",
    }
    assert len(readme_jobs()) >= 6


@pytest.mark.parametrize("name, overrides, world", slurm_jobs() + readme_jobs())
def test_every_template_and_readme_example_fits_its_gpus(name, overrides, world):
    cfg, model = job(overrides, world)
    check = estimate(cfg, model, world)
    assert check.status == "ok", (name, check.table, check.message)
    assert check.estimate.total <= check.device.budget_bytes


def test_auto_picks_every_where_last_would_not_fit():
    # 13B on 4 nodes: "last" keeps 13B x 4 bytes of unsharded fp32 gradients (about 48 GiB).
    cfg, model = job(["model=13b", "parallel.ac.mode=selective", "parallel.grad_sync=last"], 32)
    last = estimate(cfg, model, 32).estimate
    assert last.unsharded_grads / GIB == pytest.approx(4 * model.num_params() / GIB, rel=0.01)
    assert last.total > 76 * GIB  # over an 80 GB GPU less the reserve

    cfg, model = job(["model=13b", "parallel.ac.mode=selective"], 32)
    assert cfg.parallel.grad_sync == "every"
    every = estimate(cfg, model, 32).estimate
    assert every.unsharded_grads == 0 and every.total < 40 * GIB

    # One micro-batch per step keeps nothing between micro-batches: "last" (least traffic).
    cfg, _ = job(["model=7b", "train.global_batch_tokens=262144"], 64)
    assert cfg.train.grad_accum == 1 and cfg.parallel.grad_sync == "last"
    # The debug model on 2 ranks has room: "last".
    cfg, _ = job(["model=debug", "train.global_batch_tokens=65536"], 2)
    assert cfg.train.grad_accum > 1 and cfg.parallel.grad_sync == "last"


def test_auto_without_known_memory_keeps_last():
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_job_config(compose("pretrain", overrides=["model=13b", "train.steps=10000"]))
    validate_job(cfg, 32)  # CPU, no parallel.gpu: the memory is unknown
    assert cfg.parallel.grad_sync == "last"


def test_over_budget_is_an_error_naming_terms_and_a_layout_that_fits():
    overrides = ["model=70b", "parallel.ac.mode=none", "parallel.grad_sync=last"]
    cfg, model = job(overrides, 64)

    def check():
        return check_job_memory(
            model,
            parallel=cfg.parallel,
            train=cfg.train,
            seq_len=cfg.data.seq_len,
            world_size=64,
            device_type="cpu",
            gpus_per_node=8,
        )

    with pytest.raises(ValueError) as err:
        check()
    message = str(err.value)
    assert re.search(r"exceeds the 75\.6 GiB budget of parallel\.gpu=h100-sxm", message), message
    assert "the largest terms: " in message and "activations kept for backward" in message
    assert "The planner's best layout for this job" in message
    assert "parallel.memory_check=warn" in message
    # The suggested layout is a valid job that fits.
    suggested = message.split("run it with ", 1)[1].rsplit(". To run", 1)[0].split()
    cfg2, model2 = job(["model=70b", *suggested], 64)
    assert estimate(cfg2, model2, 64).status in ("ok", "warn")

    cfg.parallel.memory_check = "warn"
    assert check().status == "over"
    cfg.parallel.memory_check = "off"
    assert check() is None


def test_the_launcher_refuses_an_oversized_job_before_any_process_group(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "launch/pretrain.py",
            "model=70b",
            "parallel.ac.mode=none",
            "parallel.grad_sync=last",
            f"parallel.gpu={GPU}",
            "train.steps=10000",
            "data.paths=[does-not-matter]",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"WORLD_SIZE": "64", "PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled"},
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "exceeds the" in out.stderr and "parallel.memory_check=warn" in out.stderr
    assert "Traceback" not in out.stderr
