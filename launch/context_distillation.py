"""Safety context distillation (llama2.md, "Safety context distillation").

    torchrun --nproc_per_node 8 launch/context_distillation.py \
        policy=runs/rejection-sampling/iter-2/sft/checkpoints tokenizer=tokenizer.model \
        prompts=[data/safety_prompts.jsonl] safety_rm=runs/safety-rm/checkpoints \
        helpfulness_rm=runs/helpfulness-rm/checkpoints

The safety_tagged prompts are distilled (their "risk_category" picks the answer template);
the others are the helpful prompts on which the Helpfulness RM checks the fine-tuned model.
Hydra overrides on the command line (conf/context_distillation.yaml); the run folder is
runs/<run_name>, the distilled model in its sft/checkpoints.
"""

import hydra
from omegaconf import DictConfig

from llama_dist.config import register_configs
from llama_dist.train.common import run_entry_point
from llama_dist.train.context_distillation import context_distillation

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="context_distillation")
def main(cfg: DictConfig) -> None:
    # The composed config: its keys are checked against the schema (a stray +key fails).
    run_entry_point("context_distillation", context_distillation, cfg)


if __name__ == "__main__":
    main()
