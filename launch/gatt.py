"""Ghost Attention, GAtt (llama2.md, "Ghost Attention, GAtt").

    torchrun --nproc_per_node 8 launch/gatt.py \
        policy=runs/ppo-v3/checkpoints tokenizer=tokenizer.model dialogs=[data/dialogs.jsonl]

The policy answers the dialogs with each dialog's instruction before every user message; the
samples keep it in the first turn only and train on the last turn (sft.* settings); the
adherence of the policy and of the fine-tuned model per instruction kind and turn goes to
adherence.md. Without dialogs=[...], the synthetic task (synthetic.*; responder=rule for a
model that cannot follow instructions yet). Hydra overrides on the command line
(conf/gatt.yaml); the run folder is runs/<run_name>, the GAtt model in its sft/checkpoints.
"""

import hydra
from omegaconf import DictConfig

from llama_dist.config import register_configs
from llama_dist.train.common import run_entry_point
from llama_dist.train.gatt import gatt

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="gatt")
def main(cfg: DictConfig) -> None:
    # The composed config: its keys are checked against the schema (a stray +key fails).
    run_entry_point("gatt", gatt, cfg)


if __name__ == "__main__":
    main()
