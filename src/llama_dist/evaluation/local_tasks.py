"""Harness tasks on local data files: the bundled ones, task YAMLs of the user's, and checks.

These machines reach no dataset hub, so a task reads its data from files: a YAML with
`dataset_path: json` (or csv, parquet) and `dataset_kwargs: {data_files: ...}`. Relative data
paths are taken relative to the YAML's folder (the harness would take them relative to the
working directory), and every data file is checked before anything is evaluated, so a missing
file is one clear error instead of a traceback from the datasets library.

The bundled tasks live in `tasks/` beside this module: `llama_dist_mc` (multiple choice) and
`llama_dist_gen` (generation), small enough for tests.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _load_yaml(path: Path) -> dict[str, Any]:
    # The harness's own loader: it understands `include:` and `!function` tags.
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(path)
    if not isinstance(config, dict) or "task" not in config:
        raise ValueError(f"{path} is not a harness task YAML (it has no `task:` name)")
    return config


def bundled_tasks() -> dict[str, Path]:
    """Task name -> YAML path of the tasks shipped in llama_dist/evaluation/tasks."""
    return {_load_yaml(p)["task"]: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


def _resolve_files(files: Any, folder: Path, *, task: str, yaml_path: Path) -> Any:
    """`data_files` (a path, a list, or split -> path(s)) with relative paths made absolute
    from `folder`; ValueError naming the task and the file when one does not exist."""
    if isinstance(files, dict):
        return {
            split: _resolve_files(f, folder, task=task, yaml_path=yaml_path)
            for split, f in files.items()
        }
    if isinstance(files, (list, tuple)):
        return [_resolve_files(f, folder, task=task, yaml_path=yaml_path) for f in files]
    path = Path(os.path.expanduser(str(files)))
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise ValueError(
            f"task {task!r}: data file {str(path)!r} does not exist (dataset_kwargs.data_files "
            f"in {yaml_path}); put the file there or point data_files at it"
        )
    return str(path)


def load_task_config(path: str | os.PathLike) -> dict[str, Any]:
    """A task YAML as the config dict the harness takes in place of a task name, its data
    files resolved against the YAML's folder and checked."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"task YAML {str(path)!r} does not exist")
    config = _load_yaml(path)
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        config["dataset_kwargs"] = {
            **config["dataset_kwargs"],
            "data_files": _resolve_files(files, path.parent, task=config["task"], yaml_path=path),
        }
    return config


@functools.cache
def _task_manager() -> Any:
    """The harness's index of its own tasks, built once per process: it reads thousands of
    task YAMLs, which takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_configs(tasks: Sequence[str]) -> list[str | dict[str, Any]]:
    """What `lm_eval.simple_evaluate(tasks=...)` takes for `tasks`: each a bundled task name,
    a path to a task YAML, or a task the installed harness knows by name. ValueError naming
    the choices for anything else, before any model runs."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks={tasks!r} must be a non-empty list of task names or YAML paths")
    bundled = bundled_tasks()
    configs: list[str | dict[str, Any]] = []
    unknown = []
    for task in tasks:
        if task in bundled:
            configs.append(load_task_config(bundled[task]))
        elif task.endswith((".yaml", ".yml")):
            configs.append(load_task_config(task))
        else:
            configs.append(task)
            unknown.append(task)
    if unknown:
        known = set(_task_manager().all_tasks)
        missing = [t for t in unknown if t not in known]
        if missing:
            raise ValueError(
                f"unknown task(s) {missing}: not a bundled task ({sorted(bundled)}), not a "
                "task YAML path, and not a task of the installed lm-eval (`lm_eval ls tasks` "
                "lists them)"
            )
    return configs


def write_resolved_tasks(folder: str | os.PathLike) -> Path:
    """The bundled task YAMLs, their data paths made absolute, written into `folder` for the
    harness's `--include_path`."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in bundled_tasks().items():
        config = load_task_config(path)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def run_tasks(
    lm: Any,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 0,
    seed: int = 0,
    apply_chat_template: bool = False,
    system_instruction: str | None = None,
) -> dict[str, Any] | None:
    """`lm_eval.simple_evaluate` of `lm` (an lm-eval model, e.g. `LlamaDistLM`) on `tasks`
    (see `task_configs`): the harness's results dict ("results" per task, "samples" per task
    with log_samples). bootstrap_iters 0 skips bootstrapped standard errors (means get theirs
    in closed form). apply_chat_template: the requests in the model's chat format (a chat
    model: SFT or RLHF), after `system_instruction` as the system message when given. None
    on the processes the harness returns nothing to (all but the first of each node).
    """
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=lm,
        tasks=task_configs(tasks),
        task_manager=_task_manager(),
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        apply_chat_template=apply_chat_template,
        system_instruction=system_instruction,
    )
