"""Model-only checkpoints: a DCP checkpoint of `{"model": state_dict}` plus `model_config.json`.

This is what the converter reads and writes. Training checkpoints are DCP step folders that
hold more entries (optimizer, data loader, ...) and the same `model_config.json`;
`load_model_checkpoint` reads only the "model" entries from those, since DCP loads exactly the
keys it is asked for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from llama_dist.jsonfile import model_config_dict
from llama_dist.models.config import LlamaConfig
from llama_dist.models.hf_adapter import (
    check_state_dict,
    finish_output_folder,
    param_shapes,
    prepare_output_folder,
)

MODEL_CONFIG_FILE = "model_config.json"
# DCP writes this file last, so its presence marks a complete checkpoint.
_DCP_METADATA = ".metadata"
_STEP_DIR = re.compile(r"step-(\d+)")


@contextmanager
def _single_process() -> Iterator[None]:
    # DCP warns whenever it runs without collectives, even when asked to with no_dist=True.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_model_checkpoint(
    path: str | os.PathLike, model_state_dict: Mapping[str, torch.Tensor], cfg: LlamaConfig
) -> Path:
    """Write a model-only checkpoint of full (unsharded) tensors from a single process.

    The folder is written under a temporary sibling name and renamed when complete; an
    existing non-empty `path` is refused.
    """
    check_state_dict(model_state_dict, cfg, source="the state dict to save")
    path, tmp = prepare_output_folder(path)
    try:
        # no_dist: one process writes everything, with or without an initialised process group.
        with _single_process():
            dcp.save({"model": dict(model_state_dict)}, checkpoint_id=tmp, no_dist=True)
        config = json.dumps(cfg.to_dict(), indent=2) + "\n"
        (tmp / MODEL_CONFIG_FILE).write_text(config)
        finish_output_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def step_of(path: str | os.PathLike) -> int:
    """The step in a `step-N` folder's name."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(
            f"{path} is not named step-N, so it has no step; point at a step folder of a "
            "training checkpoint"
        )
    return int(match.group(1))


def step_checkpoints(path: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of each complete `step-N` subfolder of `path`, lowest step first."""
    steps = []
    for child in Path(path).iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and (child / _DCP_METADATA).is_file():
            steps.append((int(match.group(1)), child))
    return sorted(steps)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder `path` names: itself if it is one, else its highest complete
    `step-N` subfolder."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint folder {path} does not exist")
    if (path / _DCP_METADATA).is_file():
        return path
    steps = step_checkpoints(path)
    if steps:
        return steps[-1][1]
    raise ValueError(
        f"{path} is not a complete llama_dist checkpoint: it has no {_DCP_METADATA} (DCP writes "
        "it last) and no complete step-N subfolder; point at a finished checkpoint"
    )


def read_model_metadata(
    path: str | os.PathLike,
) -> tuple[Path, LlamaConfig, dict[str, torch.dtype]]:
    """(checkpoint folder, config, name -> stored dtype of each model tensor) of a model-only or
    a training checkpoint, read from its config and .metadata only.

    ValueError (DamagedCheckpointError for an unreadable or truncated file, named) unless the
    folder holds every model tensor of its config, with its shape.
    """
    folder = find_checkpoint(path)
    config_path = folder / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"{folder} is not a complete llama_dist checkpoint: it has no {MODEL_CONFIG_FILE}; "
            "point at a checkpoint written by llama_dist"
        )
    cfg = LlamaConfig.from_dict(model_config_dict(config_path), source=config_path)
    from llama_dist.checkpoint.manager import DamagedCheckpointError, damage

    problem = damage(folder)  # a truncated file or .metadata, named, before any read
    if problem is not None:
        raise DamagedCheckpointError(folder, problem)
    stored = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    shapes = param_shapes(cfg)
    missing = [name for name in shapes if f"model.{name}" not in stored]
    if missing:
        raise ValueError(
            f"{folder} lacks {len(missing)} model tensors of its {MODEL_CONFIG_FILE} "
            f"(e.g. {missing[:3]}); the checkpoint does not belong to that config"
        )
    dtypes = {}
    for name, shape in shapes.items():
        meta = stored[f"model.{name}"]
        if not isinstance(meta, TensorStorageMetadata) or meta.size != shape:
            raise ValueError(
                f"{folder}: model.{name} is stored as {getattr(meta, 'size', meta)}, but "
                f"{MODEL_CONFIG_FILE} implies {tuple(shape)}; the checkpoint does not belong "
                "to that config"
            )
        dtypes[name] = meta.properties.dtype
    return folder, cfg, dtypes


def load_model_checkpoint(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, full model state dict) from a model-only or a training checkpoint.

    `path` is a checkpoint folder or a folder of `step-N` checkpoints (the highest complete one
    is read). Tensors keep the dtype they were saved in. For a model too large for one
    process, read it a tensor at a time with `read_model_tensor`.
    """
    folder, cfg, dtypes = read_model_metadata(path)
    # The stored dtype, so that loading is bitwise and not a silent cast.
    shapes = param_shapes(cfg)
    state_dict = {name: torch.empty(shapes[name], dtype=dtype) for name, dtype in dtypes.items()}
    # Only the "model" entries are requested; optimizer and other state is not read.
    with _single_process():
        dcp.load({"model": state_dict}, checkpoint_id=folder, no_dist=True)
    return cfg, state_dict


def read_model_tensor(
    folder: Path, name: str, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """Model tensor `name` of the checkpoint in `folder` (as `read_model_metadata` gives it),
    read alone by this process: DCP reads just that tensor's chunks, from any number of
    files. A failed read is a DamagedCheckpointError naming the file."""
    from llama_dist.checkpoint.manager import load_alone

    tensor = torch.empty(shape, dtype=dtype)
    load_alone({"model": {name: tensor}}, folder)
    return tensor
