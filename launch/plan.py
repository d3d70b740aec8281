"""Plan a job's layout: per-GPU memory and speed of every layout, the fastest that fit first.

python launch/plan.py model=70b cluster.gpus=2048 cluster.gpu=a100-80g
python launch/plan.py model=7b cluster.gpu=h100-sxm cluster.gpus=64 search.ac=[selective]
python launch/plan.py validate=true out=benchmarks/results/planner_validation.md
"""

import sys

import hydra
from omegaconf import DictConfig

from llama_dist.planner.cli import main as plan_main
from llama_dist.planner.cli import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    code = plan_main(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
