"""Checkpoints: DCP folders with the model config beside them."""

from llama_dist.checkpoint.model_io import (
    MODEL_CONFIG_FILE,
    find_checkpoint,
    load_model_checkpoint,
    save_model_checkpoint,
)

__all__ = [
    "MODEL_CONFIG_FILE",
    "find_checkpoint",
    "load_model_checkpoint",
    "save_model_checkpoint",
]
