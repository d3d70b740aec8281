"""The Llama 2 recipe in one command: pretrain -> SFT -> reward models -> RLHF V1..Vn -> GAtt
-> safety context distillation -> evaluation, each stage a run of its own entry point.

    python launch/recipe.py                      # the tiny CPU demo of conf/recipe.yaml
    python launch/recipe.py action=print         # the stages' commands, and which are done
    python launch/recipe.py action=slurm run_dir=/shared/runs/llama2 ...   # sbatch chain

Running it again skips the stages that are done and resumes the one that was cut short
(llama_dist/recipe.py).
"""

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from llama_dist.config_keys import to_typed_config
from llama_dist.exit_codes import EXIT_USER_ERROR
from llama_dist.recipe import RecipeConfig, run_recipe

ConfigStore.instance().store(name="recipe_schema", node=RecipeConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="recipe")
def main(cfg: DictConfig) -> None:
    logging.getLogger("llama_dist").setLevel(logging.INFO)
    try:
        code = run_recipe(to_typed_config(cfg))
    except ValueError as e:
        print(f"recipe: error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USER_ERROR
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
