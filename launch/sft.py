"""Supervised fine-tuning of a Llama 2 model on dialogs.

    torchrun --nproc_per_node 8 launch/sft.py init_from=runs/pretrain-7b/checkpoints \
        tokenizer=tokenizer.model data.paths=[data/sft.jsonl]
    torchrun --nproc_per_node 2 launch/sft.py init_from=HF_LLAMA_FOLDER ...   # CPU: gloo

Hydra overrides on the command line (conf/sft.yaml); the run folder is runs/<run_name>.
"""

import hydra
from omegaconf import DictConfig

from llama_dist.config import register_configs
from llama_dist.train.common import run_entry_point
from llama_dist.train.sft import sft

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="sft")
def main(cfg: DictConfig) -> None:
    # The composed config: its keys are checked against the schema (a stray +key fails).
    run_entry_point("sft", sft, cfg)


if __name__ == "__main__":
    main()
