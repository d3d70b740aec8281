"""PPO of a Llama 2 chat model against the reward models (the paper's RLHF).

    torchrun --nproc_per_node 8 launch/ppo.py policy=runs/sft/checkpoints \
        tokenizer=tokenizer.model prompts=[data/prompts.jsonl] scorer.kind=safety_gated \
        scorer.helpfulness_rm=runs/helpfulness-rm/checkpoints \
        scorer.safety_rm=runs/safety-rm/checkpoints

Hydra overrides on the command line (conf/ppo.yaml); the run folder is runs/<run_name>.
"""

import hydra
from omegaconf import DictConfig

from llama_dist.config import register_configs
from llama_dist.train.common import run_entry_point
from llama_dist.train.ppo import ppo

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="ppo")
def main(cfg: DictConfig) -> None:
    # The composed config: its keys are checked against the schema (a stray +key fails).
    run_entry_point("ppo", ppo, cfg)


if __name__ == "__main__":
    main()
