"""Checkpoints: DCP folders with the model config beside them."""

from llama_dist.checkpoint.manager import (
    JOB_CONFIG_FILE,
    CheckpointManager,
    DamagedCheckpointError,
    DiskFullError,
    ModelState,
    OptimizerState,
    check_checkpoint,
    damage,
    describe,
    load_alone,
    rng_state,
    set_rng_state,
)
from llama_dist.checkpoint.model_io import (
    MODEL_CONFIG_FILE,
    find_checkpoint,
    load_model_checkpoint,
    save_model_checkpoint,
    step_checkpoints,
    step_of,
)

__all__ = [
    "JOB_CONFIG_FILE",
    "MODEL_CONFIG_FILE",
    "CheckpointManager",
    "DamagedCheckpointError",
    "DiskFullError",
    "ModelState",
    "OptimizerState",
    "check_checkpoint",
    "damage",
    "describe",
    "load_alone",
    "find_checkpoint",
    "load_model_checkpoint",
    "rng_state",
    "save_model_checkpoint",
    "set_rng_state",
    "step_checkpoints",
    "step_of",
]
