"""Train a Llama 2 reward model (Helpfulness or Safety RM) on preference pairs.

    torchrun --nproc_per_node 8 launch/reward.py init_from=runs/sft/checkpoints \
        tokenizer=tokenizer.model data.paths=[data/pairs.jsonl]
    torchrun --nproc_per_node 8 launch/reward.py --config-name reward_safety ...  # a mix

Hydra overrides on the command line (conf/reward.yaml); the run folder is runs/<run_name>.
At the end it prints the held-out accuracy table and writes it to <run>/reward_eval.md.
"""

import hydra
from omegaconf import DictConfig

from llama_dist.config import register_configs
from llama_dist.train.common import run_entry_point
from llama_dist.train.reward import train_reward_model

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="reward")
def main(cfg: DictConfig) -> None:
    # The composed config: its keys are checked against the schema (a stray +key fails).
    run_entry_point("reward", train_reward_model, cfg)


if __name__ == "__main__":
    main()
