"""Harness tasks on the model being trained, at validation steps (`harness.tasks`).

Every rank calls together: the adapter deals the requests over the data-parallel ranks of the
training layout, the model sharded as it trains (FSDP, TP with sequence and loss parallelism).
The harness seeds Python's, NumPy's and torch's generators; the run's states are put back
afterwards, so a run with the evaluation draws what it would draw without it.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.distributed.device_mesh import DeviceMesh

from llama_dist.config import HarnessConfig
from llama_dist.models.llama import Llama
from llama_dist.tokenizer import Tokenizer


def check_harness_tasks(h: HarnessConfig) -> None:
    """ValueError, before any process group, when the eval extra is missing or a task is
    unknown or lacks its data file."""
    if not h.tasks:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"harness.tasks needs lm-evaluation-harness ({e}); install the eval extra: "
            "pip install -e '.[eval]', or set harness.tasks=[]"
        ) from e
    from llama_dist.evaluation.local_tasks import task_configs

    try:
        task_configs(h.tasks)
    except ValueError as e:
        raise ValueError(f"harness.tasks: {e}") from e


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{"TASK/METRIC": value} of a harness results dict, without standard errors and sample
    counts; the default filter's suffix is dropped (acc,none -> acc), others kept
    (exact_match,flexible -> exact_match_flexible)."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key in ("sample_len", "sample_count"):  # how many documents, not a score
                continue
            name = key.removesuffix(",none").replace(",", "_")
            out[f"{task}/{name}"] = float(value)
    return out


@contextlib.contextmanager
def kept_rng_state(device: torch.device) -> Iterator[None]:
    """Restore Python's, NumPy's and torch's generator states (CPU, and `device`'s when it
    is a GPU) on exit."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


class PeriodicEvaluation:
    """`harness.tasks` on `model` at the validation steps `harness.every` selects."""

    def __init__(
        self,
        h: HarnessConfig,
        *,
        model: Llama,
        tokenizer: Tokenizer,
        mesh: DeviceMesh | None,
        sequence_parallel: bool,
        total_steps: int,
    ) -> None:
        self.h, self.total_steps = h, total_steps
        self._device = model.tok_embeddings.weight.device
        self._lm = None
        if h.tasks:
            from llama_dist.evaluation.lm_eval_adapter import LlamaDistLM

            self._lm = LlamaDistLM.from_model(
                model,
                tokenizer,
                mesh=mesh,
                sequence_parallel=sequence_parallel,
                batch_size=h.batch_size,
                max_gen_toks=h.max_gen_toks,
                seed=h.seed,
            )

    def due(self, step: int) -> bool:
        if self._lm is None:
            return False
        return step in (0, self.total_steps) or not self.h.every or step % self.h.every == 0

    def __call__(self, step: int) -> dict[str, float] | None:
        """The flat metrics of the tasks at `step` on the rank that has them (the first of
        each node: the harness returns None elsewhere), None elsewhere or when not due."""
        if not self.due(step):
            return None
        from llama_dist.evaluation.local_tasks import run_tasks

        with kept_rng_state(self._device), torch.no_grad():
            results = run_tasks(
                self._lm,
                self.h.tasks,
                num_fewshot=self.h.num_fewshot,
                limit=self.h.limit,
                seed=self.h.seed,
            )
        return None if results is None else flat_metrics(results)
