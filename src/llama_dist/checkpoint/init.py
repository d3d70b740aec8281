"""Starting weights for a job (pretraining's `checkpoint.init_from`, the fine-tuning loops'
`init_from` and policies): a llama_dist checkpoint or a Hugging Face folder, loaded straight
into a sharded model.

No process holds the full model, and each rank reads only the slices of its own shards: a
llama_dist checkpoint is read by DCP's FileSystemReader, an HF safetensors folder by DCP's
HuggingFaceStorageReader, which reads a slice of a safetensors tensor without the rest. Only
an HF folder of `pytorch_model*.bin` files is read in full, one tensor at a time, on every
rank (a pickle cannot be sliced).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from llama_dist.checkpoint.manager import _dcp_context, check_checkpoint, model_shape
from llama_dist.checkpoint.model_io import MODEL_CONFIG_FILE, find_checkpoint
from llama_dist.jsonfile import model_config_dict, read_json_object
from llama_dist.models.config import LlamaConfig
from llama_dist.models.hf_adapter import (
    _is_hf_buffer,
    _is_rotary,
    _weight_files,
    check_safetensors_file,
    config_from_hf,
    from_hf_tensor,
    hf_architecture,
    iter_hf_weights,
    read_hf_config,
    to_hf_key,
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


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _local_chunk(param: torch.Tensor) -> ChunkStorageMetadata:
    """Where the part of `param` this rank holds sits in the full tensor."""
    if isinstance(param, DTensor):
        # DCP's own description of a shard, right for uneven shards and for FSDP over TP.
        [chunk] = param.__create_chunk_list__()
        return chunk
    return ChunkStorageMetadata(offsets=torch.Size([0] * param.dim()), sizes=param.shape)


class _ChunkPlanner(DefaultLoadPlanner):
    """Fills plain buffers that each hold a given chunk of a stored tensor. DCP's own planner
    fills whole plain tensors or the shards of DTensors, and neither is the chunk wanted here
    (whole heads of wq/wk around a rank's rows)."""

    def __init__(self, chunks: Mapping[str, ChunkStorageMetadata]) -> None:
        super().__init__()
        self.chunks = chunks

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        stored = self.metadata.state_dict_metadata
        items = []
        for name in self.state_dict:
            items += create_read_items_for_chunk_list(name, stored[name], [self.chunks[name]])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]


def _read_hf(folder: Path, state: dict[str, torch.Tensor], planner: DefaultLoadPlanner) -> None:
    # A collective: every rank makes the same calls, with or without anything to read.
    with _dcp_context():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)), planner=planner)


def _read_hf_rotary(
    folder: Path, hf_names: Mapping[str, str], params: Mapping[str, torch.Tensor], cfg: LlamaConfig
) -> None:
    """wq and wk (our names -> HF names), whose rows HF permutes within each head (see
    llama_dist.models.hf_adapter). A shard that cuts a head, as FSDP's dim-0 shards may, needs
    rows stored outside it: each rank reads the rows of the whole heads its shard touches (at
    most one head more at each end), permutes them and keeps its own rows."""
    head_dim = cfg.head_dim
    chunks, buffers, keep = {}, {}, []
    for name, hf_name in hf_names.items():
        local, chunk = _local(params[name]), _local_chunk(params[name])
        if local.numel() == 0:  # an uneven FSDP shard may hold nothing
            continue
        first, rows = chunk.offsets[0], chunk.sizes[0]
        start = first // head_dim * head_dim
        stop = -(-(first + rows) // head_dim) * head_dim
        chunks[hf_name] = ChunkStorageMetadata(
            offsets=torch.Size([start, *chunk.offsets[1:]]),
            sizes=torch.Size([stop - start, *chunk.sizes[1:]]),
        )
        buffers[hf_name] = local.new_empty(chunks[hf_name].sizes)
        keep.append((local, hf_name, first - start))
    _read_hf(folder, buffers, _ChunkPlanner(chunks))
    for local, hf_name, skip in keep:
        # (whole heads * head_dim, cols) in our rotary layout; this rank's rows follow `skip`.
        _, heads = from_hf_tensor(hf_name, buffers[hf_name], cfg)
        local.copy_(heads[skip : skip + local.shape[0]])


def _load_hf_sliced(
    params: Mapping[str, torch.Tensor], wanted: Collection[str], folder: Path, cfg: LlamaConfig
) -> list[str]:
    """Each rank reads only what its shards hold (wq/wk: the whole heads around them); the
    tensors go straight into the parameters, except wq and wk, read a layer at a time into
    buffers of those heads."""
    for file in sorted(folder.glob("*.safetensors")):  # the files DCP's reader opens
        check_safetensors_file(file)  # named here: DCP's errors do not name the file
    stored = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    architecture = hf_architecture(cfg)
    hf_names = {name: to_hf_key(name, architecture=architecture) for name in sorted(wanted)}
    missing = [name for name, hf_name in hf_names.items() if hf_name not in stored]
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} weights of this model, e.g. {missing[:3]}")
    for name, hf_name in hf_names.items():
        shape = tuple(stored[hf_name].size)
        if shape != tuple(params[name].shape):
            raise ValueError(
                f"{folder}: {hf_name} has shape {shape} but this model's {name} is "
                f"{tuple(params[name].shape)}; the folder holds another model shape"
            )
    direct = {hf_name: params[name] for name, hf_name in hf_names.items() if not _is_rotary(name)}
    _read_hf(folder, direct, DefaultLoadPlanner())
    rotary = [name for name in hf_names if _is_rotary(name)]
    # A layer at a time, so that the buffers hold one layer's wq and wk shards.
    for _, layer in itertools.groupby(rotary, key=lambda name: name.rsplit(".attention.", 1)[0]):
        _read_hf_rotary(folder, {name: hf_names[name] for name in layer}, params, cfg)
    return list(hf_names)


def _load_hf_whole(
    params: Mapping[str, torch.Tensor], wanted: Collection[str], folder: Path, cfg: LlamaConfig
) -> list[str]:
    """Every tensor read in full on every rank, one at a time, each rank keeping its shard:
    for `pytorch_model*.bin` folders, which cannot be read in slices."""
    loaded = []
    for hf_name, tensor in iter_hf_weights(folder):
        if _is_hf_buffer(hf_name):
            continue
        name, tensor = from_hf_tensor(hf_name, tensor, cfg)
        if name not in wanted:
            continue
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(
                f"{folder}: {hf_name} has shape {tuple(tensor.shape)} but this model's {name} "
                f"is {tuple(params[name].shape)}; the folder holds another model shape"
            )
        _copy_into(params[name], tensor)
        loaded.append(name)
    missing = sorted(set(wanted) - set(loaded))
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} weights of this model, e.g. {missing[:3]}")
    return loaded


@torch.no_grad()
def load_initial_weights(
    model: nn.Module, path: str | os.PathLike, *, skip: Collection[str] = ()
) -> list[str]:
    """Load the weights at `path` into `model` (plain or sharded, on any layout), leaving the
    parameters named in `skip` (e.g. a new head) as they are. Every rank calls this. Returns
    the names loaded. The shapes must match; check with `source_config` first.

    An HF safetensors folder is read in slices, each rank reading the rows and columns of its
    own shards only (of wq and wk, whose HF rows are permuted within heads, the rows of the
    whole heads its shard touches), straight into the parameters. An HF folder of
    `pytorch_model*.bin` files is read in full, tensor by tensor, on every rank.
    """
    params = dict(model.named_parameters())
    wanted = {name for name in params if name not in skip}
    if is_hf_folder(path):
        cfg = read_hf_config(path)
        folder = Path(path)
        files = _weight_files(folder)
        if files and all(file.suffix == ".safetensors" for file in files):
            return _load_hf_sliced(params, wanted, folder, cfg)
        return _load_hf_whole(params, wanted, folder, cfg)  # says so if there are no weights

    folder = find_checkpoint(path)
    state = {k: v for k, v in get_model_state_dict(model).items() if k in wanted}
    with _dcp_context():
        dcp.load({"model": state}, checkpoint_id=folder)
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))
    return sorted(state)


def check_init_from(path: str | os.PathLike, model_config: LlamaConfig) -> None:
    """ValueError unless `path`, a llama_dist checkpoint (or run folder) or an HF Llama folder,
    holds a model of `model_config`'s shape. Reads only config files."""
    if not is_hf_folder(path):
        check_checkpoint(path, model_config)
        return
    saved, current = model_shape(read_hf_config(path)), model_shape(model_config)
    differing = [name for name in saved if saved[name] != current[name]]
    if differing:
        details = ", ".join(f"{k}={saved[k]} (this model: {current[k]})" for k in differing)
        raise ValueError(
            f"{path} holds a model of another shape: {details}; take the model's shape from "
            f"the folder with model.from_file={path}"
        )
