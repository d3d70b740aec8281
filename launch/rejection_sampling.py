"""One iteration of rejection-sampling fine-tuning (Llama 2's RLHF-V1..V5).

    torchrun --nproc_per_node 8 launch/rejection_sampling.py policy=runs/sft/checkpoints \
        tokenizer=tokenizer.model prompts=[data/prompts.jsonl] \
        scorer.reward_model=runs/helpfulness-rm/checkpoints iteration=1
    # iteration 2, from iteration 1's fine-tuned policy, pooling with iteration 1's kept set:
    torchrun ... policy=runs/rejection-sampling/iter-1/sft/checkpoints iteration=2

Hydra overrides on the command line (conf/rejection_sampling.yaml); the run folder is
runs/<run_name>, each iteration in iter-N/.
"""

import hydra
from omegaconf import DictConfig

from llama_dist.config import register_configs
from llama_dist.train.common import run_entry_point
from llama_dist.train.rejection_sampling import rejection_sampling

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="rejection_sampling")
def main(cfg: DictConfig) -> None:
    # The composed config: its keys are checked against the schema (a stray +key fails).
    run_entry_point("rejection_sampling", rejection_sampling, cfg)


if __name__ == "__main__":
    main()
