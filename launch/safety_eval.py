"""The safety evaluation of the pipeline's checkpoints on one prompt set.

    torchrun --nproc_per_node 8 launch/safety_eval.py tokenizer=tokenizer.model \
        checkpoints=[runs/sft/checkpoints,runs/ppo-v2/checkpoints,runs/cd/sft/checkpoints] \
        names=[SFT,V2,distilled] prompts=[data/safety_prompts.jsonl] \
        safety_rm=runs/safety-rm/checkpoints helpfulness_rm=runs/helpfulness-rm/checkpoints
    # on the synthetic task, judge violations and helpfulness by its rule too: judge=synthetic

Hydra overrides on the command line (conf/safety_eval.yaml); the run folder is
runs/<run_name>: safety_eval.md, safety_eval.json, safety_eval.png, and with two checkpoints or
more win_rates.md and win_rates.png (each against the first).
"""

import hydra
from omegaconf import DictConfig

from llama_dist.config import register_configs
from llama_dist.rlhf.safety_eval import safety_eval
from llama_dist.train.common import run_entry_point

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="safety_eval")
def main(cfg: DictConfig) -> None:
    # The composed config: its keys are checked against the schema (a stray +key fails).
    run_entry_point("safety_eval", safety_eval, cfg)


if __name__ == "__main__":
    main()
