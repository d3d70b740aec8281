"""Pretrain a Llama 2 model.

    torchrun --nproc_per_node 8 launch/pretrain.py model=7b parallel.tp=2 data.paths=[...]
    torchrun --nproc_per_node 2 launch/pretrain.py model=debug   # CPU: gloo is chosen

Hydra overrides on the command line; the resolved config is saved into the run folder
(`hydra.run.dir`, default runs/<run_name>), which all ranks share.
"""

import sys
from pathlib import Path

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from llama_dist.config import register_configs, to_job_config
from llama_dist.train.pretrain import pretrain

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    job = to_job_config(cfg)
    try:
        pretrain(job, Path(HydraConfig.get().runtime.output_dir))
    except ValueError as e:
        print(f"pretrain: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
