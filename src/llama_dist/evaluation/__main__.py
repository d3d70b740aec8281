"""`python -m llama_dist.evaluation ARGS`: the `lm_eval` command line with the "llama_dist"
model registered and the bundled tasks (llama_dist_mc, llama_dist_gen) on the include path.

    python -m llama_dist.evaluation --model llama_dist --model_args \
        checkpoint=runs/cpu-demo/checkpoints,tokenizer=data/shakespeare/tokenizer.model \
        --tasks llama_dist_mc,llama_dist_gen --output_path runs/cpu-demo/eval
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    # Imported for its side effect: the harness's registry gets "llama_dist".
    import llama_dist.evaluation.lm_eval_adapter  # noqa: F401
    from llama_dist.evaluation.local_tasks import write_resolved_tasks

    args = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="llama_dist_tasks-") as tmp:
        if "--include_path" not in args:
            args += ["--include_path", str(write_resolved_tasks(tmp))]
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm_eval", *args]
        cli_evaluate()


if __name__ == "__main__":
    main()
