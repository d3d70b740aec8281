"""`python -m llama_dist.evaluation ARGS`: the `lm_eval` command line with the "llama_dist"
model registered and the bundled tasks (llama_dist_mc, llama_dist_gen) on the include path.

    python -m llama_dist.evaluation --model llama_dist --model_args \
        checkpoint=runs/cpu-demo/checkpoints,tokenizer=data/shakespeare/tokenizer.model \
        --tasks llama_dist_mc,llama_dist_gen --output_path runs/cpu-demo/eval

Under torchrun every rank runs it (the model sharded, see `LlamaDistLM`); only rank 0 writes
the output path, samples and wandb or hub logs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence

# What writes files or logs runs: on a multi-node job the harness returns results on the first
# process of every node, which would all write them; only rank 0 keeps these.
_WRITERS = {
    "--output_path": 1,
    "-o": 1,
    "--log_samples": 0,
    "-s": 0,
    "--wandb_args": None,  # one or more values
    "--wandb_config_args": None,
    "--hf_hub_log_args": None,
}


def args_for_rank(args: Sequence[str], rank: int) -> list[str]:
    """`args` as rank `rank` runs them: every rank but 0 without the options that write
    results or log them (output path, samples, wandb, the hub)."""
    if rank == 0:
        return list(args)
    kept, i = [], 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        if name not in _WRITERS:
            kept.append(args[i])
            i += 1
            continue
        i += 1
        if "=" in args[i - 1]:
            continue
        values = _WRITERS[name]
        if values is None:  # everything up to the next option
            while i < len(args) and not args[i].startswith("-"):
                i += 1
        else:
            i += values
    return kept


def main(argv: Sequence[str] | None = None) -> None:
    # Imported for its side effect: the harness's registry gets "llama_dist".
    import llama_dist.evaluation.lm_eval_adapter  # noqa: F401
    from llama_dist.evaluation.local_tasks import write_resolved_tasks

    args = args_for_rank(sys.argv[1:] if argv is None else argv, int(os.environ.get("RANK", "0")))
    with tempfile.TemporaryDirectory(prefix="llama_dist_tasks-") as tmp:
        if "--include_path" not in args:
            args += ["--include_path", str(write_resolved_tasks(tmp))]
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm_eval", *args]
        cli_evaluate()


if __name__ == "__main__":
    main()
