"""Evaluate a checkpoint on harness tasks; the table lands in the checkpoint's run folder.

    python launch/evaluate.py checkpoint=runs/cpu-demo/checkpoints \
        tokenizer=data/shakespeare/tokenizer.model tasks=[llama_dist_mc,llama_dist_gen]
    # -> runs/cpu-demo/eval/latest/results.md and results.json

Hydra overrides on the command line (conf/evaluate.yaml). Needs the eval extra.
"""

import hydra
from omegaconf import DictConfig

from llama_dist.config import register_configs
from llama_dist.evaluation.job import evaluate_checkpoint
from llama_dist.train.common import run_entry_point

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    # The composed config: its keys are checked against the schema (a stray +key fails).
    run_entry_point("evaluate", evaluate_checkpoint, cfg)


if __name__ == "__main__":
    main()
