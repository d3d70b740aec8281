"""Evaluation with EleutherAI's lm-evaluation-harness (the `eval` extra: lm-eval, accelerate).

`LlamaDistLM` is the harness model "llama_dist" over a llama_dist or HF checkpoint;
`run_tasks` evaluates it on bundled tasks, local task YAMLs or the harness's own tasks.
`python -m llama_dist.evaluation ...` is the `lm_eval` command line with "llama_dist"
registered and the bundled tasks on its include path.
"""

from llama_dist.evaluation.lm_eval_adapter import LlamaDistLM, resolve_tokenizer
from llama_dist.evaluation.local_tasks import (
    bundled_tasks,
    load_task_config,
    run_tasks,
    task_configs,
)

__all__ = [
    "LlamaDistLM",
    "bundled_tasks",
    "load_task_config",
    "resolve_tokenizer",
    "run_tasks",
    "task_configs",
]
