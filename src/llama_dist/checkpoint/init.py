"""Starting weights for a fine-tuning job: a llama_dist checkpoint or a Hugging Face folder,
loaded straight into a sharded model.

No process holds the full model: a llama_dist checkpoint is read by DCP, each rank reading
its own shards; an HF folder is read one tensor at a time, each rank keeping its shard of it.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from llama_dist.checkpoint.manager import _dcp_context
from llama_dist.checkpoint.model_io import MODEL_CONFIG_FILE, find_checkpoint
from llama_dist.jsonfile import model_config_dict, read_json_object
from llama_dist.models.config import LlamaConfig
from llama_dist.models.hf_adapter import (
    _is_hf_buffer,
    config_from_hf,
    from_hf_tensor,
    iter_hf_weights,
    read_hf_config,
)


def is_hf_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def source_config(path: str | os.PathLike) -> LlamaConfig:
    """The model config of a llama_dist checkpoint (or run folder of step-N checkpoints) or an
    HF Llama folder; reads only config files."""
    if is_hf_folder(path):
        return read_hf_config(path)
    folder = find_checkpoint(path)
    config_path = folder / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"{folder} has no {MODEL_CONFIG_FILE}; point at a llama_dist checkpoint or an HF "
            "Llama folder (with config.json)"
        )
    return LlamaConfig.from_dict(model_config_dict(config_path), source=config_path)


def model_config_from_path(path: str | os.PathLike) -> LlamaConfig:
    """A model's shape from a file or a folder: an HF config.json, a llama_dist
    model_config.json, or a folder holding one (an HF model folder, a checkpoint or a run
    folder of step-N checkpoints). Reads only config files; errors name the file."""
    path = Path(path)
    if path.is_dir():
        return source_config(path)
    if not path.is_file():
        raise ValueError(
            f"model config {path} does not exist; point at an HF config.json, a llama_dist "
            f"{MODEL_CONFIG_FILE}, or a folder holding one"
        )
    data = read_json_object(
        path, fix=f"point at an HF config.json or a llama_dist {MODEL_CONFIG_FILE}"
    )
    if "hidden_size" in data or "model_type" in data:
        try:
            return config_from_hf(data)
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{path} is not a usable HF Llama config ({e})") from e
    return LlamaConfig.from_dict(data, source=path)


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    full = full.to(dtype=param.dtype)
    if isinstance(param, DTensor):
        # Every rank holds the full tensor and keeps its own shard: no communication.
        full = full.to(param.to_local().device)
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full.to(param.device))


@torch.no_grad()
def load_initial_weights(
    model: nn.Module, path: str | os.PathLike, *, skip: Collection[str] = ()
) -> list[str]:
    """Load the weights at `path` into `model` (plain or sharded, on any layout), leaving the
    parameters named in `skip` (e.g. a new head) as they are. Every rank calls this. Returns
    the names loaded. The shapes must match; check with `source_config` first."""
    params = dict(model.named_parameters())
    wanted = {name for name in params if name not in skip}
    if is_hf_folder(path):
        cfg = read_hf_config(path)
        loaded = []
        for hf_name, tensor in iter_hf_weights(path):
            if _is_hf_buffer(hf_name):
                continue
            name, tensor = from_hf_tensor(hf_name, tensor, cfg)
            if name not in wanted:
                continue
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"{path}: {hf_name} has shape {tuple(tensor.shape)} but this model's {name} "
                    f"is {tuple(params[name].shape)}; the folder holds another model shape"
                )
            _copy_into(params[name], tensor)
            loaded.append(name)
        missing = sorted(wanted - set(loaded))
        if missing:
            raise ValueError(
                f"{path} lacks {len(missing)} weights of this model, e.g. {missing[:3]}"
            )
        return loaded

    folder = find_checkpoint(path)
    state = {k: v for k, v in get_model_state_dict(model).items() if k in wanted}
    with _dcp_context():
        dcp.load({"model": state}, checkpoint_id=folder)
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))
    return sorted(state)
