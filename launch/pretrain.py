"""Pretrain a Llama 2 model.

    torchrun --nproc_per_node 8 launch/pretrain.py model=7b parallel.tp=2 data.paths=[...]
    torchrun --nproc_per_node 2 launch/pretrain.py model=debug   # CPU: gloo is chosen

Hydra overrides on the command line; the resolved config is saved into the run folder
(`hydra.run.dir`, default runs/<run_name>), which all ranks share.
"""

import hydra
from omegaconf import DictConfig

from llama_dist.config import register_configs
from llama_dist.train.common import run_entry_point
from llama_dist.train.pretrain import pretrain

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    # The composed config: its keys are checked against the schema (a stray +key fails).
    run_entry_point("pretrain", pretrain, cfg)


if __name__ == "__main__":
    main()
