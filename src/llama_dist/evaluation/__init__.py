"""Evaluation with EleutherAI's lm-evaluation-harness (the `eval` extra: lm-eval, accelerate).

`LlamaDistLM` is the harness model "llama_dist" over a llama_dist or HF checkpoint (or a model
in memory: `LlamaDistLM.from_model`); `run_tasks` evaluates it on bundled tasks, local task
YAMLs or the harness's own tasks. `python -m llama_dist.evaluation ...` is the `lm_eval`
command line with "llama_dist" registered and the bundled tasks on its include path.

The names below are imported on first use, so that `llama_dist.evaluation.periodic` (which
pretraining imports) needs the harness only when tasks are configured.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LlamaDistLM": "lm_eval_adapter",
    "resolve_tokenizer": "lm_eval_adapter",
    "bundled_tasks": "local_tasks",
    "load_task_config": "local_tasks",
    "run_tasks": "local_tasks",
    "task_configs": "local_tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
