"""The evaluation job (launch/evaluate.py): one checkpoint on a list of harness tasks, its results
table written into the checkpoint's run folder.

For runs/NAME/checkpoints/step-N the results go to runs/NAME/eval/step-N/, for a folder of
step checkpoints (its latest complete one is read) to runs/NAME/eval/latest/, for any other
folder (an HF one) to FOLDER/eval/: results.md (the harness's table) and results.json (the
harness's results, versions and settings, and what was evaluated).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from llama_dist.config import EvaluateJobConfig
from llama_dist.parallel import ParallelConfig


def results_folder(checkpoint: str | Path) -> Path:
    """Where the results of `checkpoint` go (see the module docstring)."""
    path = Path(checkpoint)
    if path.name == "checkpoints":
        return path.parent / "eval" / "latest"
    if path.parent.name == "checkpoints":
        return path.parent.parent / "eval" / path.name
    return path / "eval"


def write_results(results: dict[str, Any], folder: Path, *, record: dict[str, Any]) -> None:
    """results.md and results.json of a `run_tasks` result in `folder`."""
    from lm_eval.utils import handle_non_serializable, make_table

    folder.mkdir(parents=True, exist_ok=True)
    table = make_table(results)
    if "groups" in results:
        table += "\n" + make_table(results, "groups")
    lines = [f"# Evaluation of {record['checkpoint']}", ""]
    lines += [f"- {key}: {value}" for key, value in record.items() if key != "checkpoint"]
    (folder / "results.md").write_text("\n".join(lines) + "\n\n" + table)
    kept = {k: v for k, v in results.items() if k != "samples"}
    (folder / "results.json").write_text(
        json.dumps({**record, **kept}, indent=2, default=handle_non_serializable) + "\n"
    )


def evaluate_checkpoint(cfg: EvaluateJobConfig, run_dir: Path) -> dict[str, Any] | None:
    """Evaluate `cfg.checkpoint` on `cfg.tasks`; the harness's results dict (None on every
    rank but the first). `run_dir` (Hydra's) is unused: results belong beside the checkpoint
    they describe (`cfg.out_dir` overrides). Under torchrun every rank calls this."""
    del run_dir
    from llama_dist.checkpoint.init import source_config
    from llama_dist.evaluation.lm_eval_adapter import LlamaDistLM
    from llama_dist.evaluation.local_tasks import run_tasks, task_configs
    from llama_dist.parallel.mesh import init_distributed

    if not cfg.checkpoint:
        raise ValueError("checkpoint is not set; pass checkpoint=runs/NAME/checkpoints")
    task_configs(cfg.tasks)  # a bad task name or data file fails before the model loads
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # the layout is checked before any process group exists
        ParallelConfig(tp=cfg.tp, dp_replicate=cfg.dp_replicate).validate(
            world_size, source_config(cfg.checkpoint)
        )
        init_distributed(device=cfg.device, timeout_s=cfg.collective_timeout_s)
    lm = LlamaDistLM(
        checkpoint=cfg.checkpoint,
        tokenizer=cfg.tokenizer,
        batch_size=cfg.batch_size,
        max_gen_toks=cfg.max_gen_toks,
        add_bos_token=cfg.add_bos_token,
        device=None if cfg.device == "auto" else cfg.device,
        dtype=cfg.dtype,
        seed=cfg.seed,
        tp=cfg.tp,
        dp_replicate=cfg.dp_replicate,
    )
    results = run_tasks(
        lm,
        cfg.tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        seed=cfg.seed,
        apply_chat_template=cfg.apply_chat_template,
        system_instruction=cfg.system_instruction,
    )
    if (dist.get_rank() if dist.is_initialized() else 0) != 0:
        return None  # the harness returns results on each node's first rank; one writes
    folder = Path(cfg.out_dir) if cfg.out_dir else results_folder(cfg.checkpoint)
    record = {
        "checkpoint": cfg.checkpoint,
        "tokenizer": lm.tokenizer_path,
        "tasks": list(cfg.tasks),
        "num_fewshot": cfg.num_fewshot,
        "limit": cfg.limit,
        "apply_chat_template": cfg.apply_chat_template,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tp": cfg.tp,
    }
    write_results(results, folder, record=record)
    print(f"evaluate: wrote {folder / 'results.md'} and results.json", flush=True)
    return results
