"""Conversion between llama_dist's Llama and Hugging Face Llama folders.

A language model (`LlamaConfig.output_dim` None) is a `LlamaForCausalLM`, its head `lm_head`; a
model with another head (a reward model, output_dim 1) is a `LlamaForSequenceClassification`
with `num_labels = output_dim`, its head `score`. The backbone is `model.*` in both.

Parameter names differ (Meta reference names here, `model.layers.N.self_attn.q_proj` there), and
so does the rotary layout: Meta rotates consecutive pairs (x[2i], x[2i+1]) of each head while
HF's `rotate_half` pairs x[i] with x[i + head_dim / 2]. The rows of wq and wk are permuted
accordingly, as HF's own `convert_llama_weights_to_hf.py` does. Everything works one tensor at
a time (`to_hf_tensor`, `from_hf_tensor`) so a caller can stream a model that does not fit in
memory; the dict and folder functions are built on those.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llama_dist.jsonfile import read_json_object
from llama_dist.models.config import LlamaConfig, RopeScaling
from llama_dist.models.llama import Llama

# Llama 2's SentencePiece ids (../shared/docs/llama2.md, "Architecture").
BOS_ID = 1
EOS_ID = 2
# Written as pad_token_id of exported sequence classifiers, which find each sequence's last
# token as the rightmost one that is not padding. Llama 2 has no pad piece; unk (0) is never
# produced by its byte-fallback tokenizer, and, unlike eos, it is never a sequence's last real
# token. llama_dist's preference batches pad with it too.
PAD_ID = 0

CAUSAL_LM = "LlamaForCausalLM"
SEQUENCE_CLASSIFIER = "LlamaForSequenceClassification"
# The output projection's HF name per architecture; every other name is shared.
_HEAD_TO_HF = {CAUSAL_LM: "lm_head.weight", SEQUENCE_CLASSIFIER: "score.weight"}

_TOP_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
}
_LAYER_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_FROM_HF = {v: k for k, v in _TOP_TO_HF.items()}
_LAYER_FROM_HF = {v: k for k, v in _LAYER_TO_HF.items()}
_ROTARY_WEIGHTS = ("attention.wq.weight", "attention.wk.weight")
_OUR_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Older HF checkpoints saved the rotary frequency table; it is derived from the config.
_HF_BUFFER_KEY = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.\w*inv_freq")

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_REQUIRED_HF_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
)


# Names ----------------------------------------------------------------------------------------
def hf_architecture(cfg: LlamaConfig) -> str:
    """The HF class a model of `cfg` is saved as: LlamaForCausalLM for an LM head, else
    LlamaForSequenceClassification."""
    return CAUSAL_LM if cfg.is_lm_head else SEQUENCE_CLASSIFIER


def _check_architecture(architecture: str) -> None:
    if architecture not in _HEAD_TO_HF:
        raise ValueError(
            f"architecture {architecture!r} is not one llama_dist converts; use one of "
            f"{sorted(_HEAD_TO_HF)}"
        )


def to_hf_key(key: str, *, architecture: str = CAUSAL_LM) -> str:
    """HF name of our parameter `key`, e.g. layers.3.attention.wq.weight ->
    model.layers.3.self_attn.q_proj.weight; output.weight is lm_head.weight of a
    LlamaForCausalLM and score.weight of a LlamaForSequenceClassification."""
    _check_architecture(architecture)
    if key == "output.weight":
        return _HEAD_TO_HF[architecture]
    if key in _TOP_TO_HF:
        return _TOP_TO_HF[key]
    match = _OUR_LAYER_KEY.fullmatch(key)
    if match and match.group(2) in _LAYER_TO_HF:
        return f"model.layers.{match.group(1)}.{_LAYER_TO_HF[match.group(2)]}"
    raise ValueError(f"{key!r} is not a llama_dist Llama parameter; no HF name is known for it")


def from_hf_key(hf_key: str, *, architecture: str = CAUSAL_LM) -> str:
    """Our name of the HF parameter `hf_key` of `architecture` (inverse of `to_hf_key`)."""
    _check_architecture(architecture)
    if hf_key == _HEAD_TO_HF[architecture]:
        return "output.weight"
    if hf_key in _TOP_FROM_HF:
        return _TOP_FROM_HF[hf_key]
    match = _HF_LAYER_KEY.fullmatch(hf_key)
    if match and match.group(2) in _LAYER_FROM_HF:
        return f"layers.{match.group(1)}.{_LAYER_FROM_HF[match.group(2)]}"
    raise ValueError(
        f"{hf_key!r} is not a {architecture} parameter this converter knows; "
        "only bias-free Llama 2 weights can be converted"
    )


def _is_hf_buffer(hf_key: str) -> bool:
    return _HF_BUFFER_KEY.fullmatch(hf_key) is not None


# Tensors --------------------------------------------------------------------------------------
def _is_rotary(key: str) -> bool:
    return key.endswith(_ROTARY_WEIGHTS)


def _interleaved_to_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    # The head count comes from the rows, so a tensor-parallel shard of whole heads works too.
    rows, cols = w.shape
    # (heads, head_dim/2, 2, cols) -> (heads, 2, head_dim/2, cols): pair members 2i, 2i+1 of a
    # head move to rows i and i + head_dim/2.
    return w.reshape(-1, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _half_to_interleaved(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    rows, cols = w.shape
    # (heads, 2, head_dim/2, cols) -> (heads, head_dim/2, 2, cols)
    return w.reshape(-1, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf_tensor(key: str, tensor: torch.Tensor, cfg: LlamaConfig) -> tuple[str, torch.Tensor]:
    """(HF name, HF tensor) for our parameter `key`; wq and wk rows are permuted."""
    hf_key = to_hf_key(key, architecture=hf_architecture(cfg))
    if _is_rotary(key):
        tensor = _interleaved_to_half(tensor, cfg.head_dim)
    return hf_key, tensor


def from_hf_tensor(hf_key: str, tensor: torch.Tensor, cfg: LlamaConfig) -> tuple[str, torch.Tensor]:
    """(our name, our tensor) for the HF parameter `hf_key` (inverse of `to_hf_tensor`)."""
    key = from_hf_key(hf_key, architecture=hf_architecture(cfg))
    if _is_rotary(key):
        tensor = _half_to_interleaved(tensor, cfg.head_dim)
    return key, tensor


def param_shapes(cfg: LlamaConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor in `Llama(cfg).state_dict()`, without allocating it."""
    with torch.device("meta"):
        model = Llama(cfg)
    return {name: t.shape for name, t in model.state_dict().items()}


def _preview(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _raise_on_mismatch(
    source: str, what: str, hint: str, *, missing: list[str], extra: list[str], wrong: list[str]
) -> None:
    """One message for tensors missing, unexpected or of the wrong shape (in that order)."""
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors ({_preview(missing)})")
        if extra:
            parts.append(f"unexpected {len(extra)} tensors ({_preview(extra)})")
        raise ValueError(f"{source} does not match {what}: " + "; ".join(parts) + f". {hint}")
    if wrong:
        raise ValueError(
            f"{source} has tensors of the wrong shape for {what}: {_preview(wrong)}. {hint}"
        )


def check_state_dict(sd: Mapping[str, torch.Tensor], cfg: LlamaConfig, *, source: str) -> None:
    """ValueError unless `sd` has exactly the tensors of `Llama(cfg)`, with their shapes.

    `source` says where the tensors came from, for the message.
    """
    expected = param_shapes(cfg)
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {tuple(sd[k].shape)} != {tuple(s)}"
        for k, s in expected.items()
        if k in sd and sd[k].shape != s
    ]
    _raise_on_mismatch(
        source,
        f"the model config ({cfg.n_layers} layers)",
        "Check that the config belongs to these weights and the weights are complete",
        missing=missing,
        extra=extra,
        wrong=wrong,
    )


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our full state dict in HF names (of `hf_architecture(cfg)`) and rotary layout."""
    check_state_dict(sd, cfg, source="the llama_dist state dict")
    return dict(to_hf_tensor(k, t, cfg) for k, t in sd.items())


def _convert_from_hf(
    items: Iterable[tuple[str, torch.Tensor]], cfg: LlamaConfig, *, source: str
) -> dict[str, torch.Tensor]:
    expected = param_shapes(cfg)
    architecture = hf_architecture(cfg)
    ours: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    wrong: list[str] = []
    for hf_key, tensor in items:
        if _is_hf_buffer(hf_key):
            continue
        try:
            key = from_hf_key(hf_key, architecture=architecture)
        except ValueError:
            key = None
        if key not in expected:  # not a Llama parameter, or a layer beyond n_layers
            unexpected.append(hf_key)
            continue
        seen.add(key)
        # Checked before the rotary permutation, which cannot reshape a tensor of another size.
        if tensor.shape != expected[key]:
            wrong.append(f"{hf_key} {tuple(tensor.shape)} != {tuple(expected[key])}")
            continue
        ours[key] = from_hf_tensor(hf_key, tensor, cfg)[1]
    missing = [to_hf_key(k, architecture=architecture) for k in expected if k not in seen]
    _raise_on_mismatch(
        source,
        f"its config ({architecture}, {cfg.n_layers} layers, untied embeddings, no biases)",
        "Check that config.json belongs to these weights and that no weight file is missing",
        missing=missing,
        extra=unexpected,
        wrong=wrong,
    )
    return ours


def from_hf_state_dict(
    hf_sd: Mapping[str, torch.Tensor], cfg: LlamaConfig
) -> dict[str, torch.Tensor]:
    """An HF `LlamaForCausalLM` (or, for a config with `output_dim`,
    `LlamaForSequenceClassification`) state dict in our names and rotary layout.

    HF's rotary frequency buffers, which older versions saved, are skipped.
    """
    return _convert_from_hf(hf_sd.items(), cfg, source="the HF state dict")


# Config ---------------------------------------------------------------------------------------
def config_to_hf(cfg: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A `config.json` dict for HF `LlamaForCausalLM` with the shape of `cfg`, or for
    `LlamaForSequenceClassification` when `cfg.output_dim` is set: num_labels = output_dim,
    problem_type "regression" for one label (a reward), and pad_token_id = PAD_ID, without
    which transformers scores only batches of one sequence.

    Rotary settings are written twice: `rope_parameters`, which transformers 5 reads, and the
    legacy `rope_theta` / `rope_scaling`, which transformers 4 reads. Transformers 5 accepts
    both and lets `rope_scaling` take precedence, so the two must (and do) agree.
    """
    cfg.validate()
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot be exported; use one of {list(_DTYPE_NAMES)}")
    if cfg.rope_scaling.kind == "linear":
        rope_parameters = {
            "rope_type": "linear",
            "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_scaling.factor,
        }
        rope_scaling = {"rope_type": "linear", "factor": cfg.rope_scaling.factor}
    else:
        rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        rope_scaling = None
    hf_config = {
        "architectures": [hf_architecture(cfg)],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_parameters": rope_parameters,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "use_cache": True,
        # transformers 5 reads "dtype", older versions "torch_dtype".
        "dtype": _DTYPE_NAMES[dtype],
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    if not cfg.is_lm_head:
        num_labels = cfg.output_width
        hf_config["pad_token_id"] = PAD_ID
        # transformers derives num_labels from id2label; both are written so that either a
        # reader of num_labels or of id2label sees the same head.
        hf_config["num_labels"] = num_labels
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        if num_labels == 1:
            hf_config["problem_type"] = "regression"
    return hf_config


def _rope_from_hf(hf_config: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    # transformers 5 writes `rope_parameters`; older configs `rope_theta` and `rope_scaling`
    # (whose type key was "type" before "rope_type"). transformers 5 lets `rope_scaling` win.
    params = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    field = "rope_scaling" if hf_config.get("rope_scaling") else "rope_parameters"
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type == "linear":
        if "factor" not in params:
            raise ValueError(f"config.json {field} has rope_type 'linear' but no factor; add it")
        return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
    raise ValueError(
        f"config.json {field}.rope_type={rope_type!r} is not supported; llama_dist implements "
        "'default' and 'linear' rotary embeddings only"
    )


def config_from_hf(hf_config: Mapping[str, Any]) -> LlamaConfig:
    """Our `LlamaConfig` from an HF `config.json` dict of a Llama model.

    A `LlamaForSequenceClassification` becomes a config with `output_dim` = its number of
    labels (transformers' default of 2 when the config names none). The FFN width is taken as
    an explicit `ffn_hidden_dim`, so no rounding rule is needed.
    """
    architectures = hf_config.get("architectures") or [CAUSAL_LM]
    model_type = hf_config.get("model_type")
    if model_type != "llama" or len(architectures) != 1 or architectures[0] not in _HEAD_TO_HF:
        raise ValueError(
            f"config.json describes model_type={model_type!r}, architectures={architectures}; "
            f"this converts Llama models only (model_type 'llama', {CAUSAL_LM} or "
            f"{SEQUENCE_CLASSIFIER})"
        )
    output_dim = None
    if architectures[0] == SEQUENCE_CLASSIFIER:
        output_dim = _num_labels(hf_config)
    unsupported = {
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    for name, supported in unsupported.items():
        value = hf_config.get(name, supported)
        if value != supported:
            raise ValueError(
                f"config.json {name}={value!r} is not supported; llama_dist's Llama needs "
                f"{name}={supported!r} (Llama 2's architecture)"
            )
    missing = [name for name in _REQUIRED_HF_FIELDS if hf_config.get(name) is None]
    if missing:
        raise ValueError(f"config.json lacks {missing}; it is not a complete Llama config")
    dim = hf_config["hidden_size"]
    n_heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim * n_heads != dim:
        raise ValueError(
            f"config.json head_dim={head_dim} is not hidden_size / num_attention_heads = "
            f"{dim} / {n_heads}; llama_dist's Llama needs head_dim * heads == hidden_size"
        )
    theta, scaling = _rope_from_hf(hf_config)
    return LlamaConfig(
        dim=dim,
        n_layers=hf_config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf_config.get("num_key_value_heads") or n_heads,
        vocab_size=hf_config["vocab_size"],
        ffn_hidden_dim=hf_config["intermediate_size"],
        norm_eps=float(hf_config["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=hf_config["max_position_embeddings"],
        output_dim=output_dim,
    ).validate()


def _num_labels(hf_config: Mapping[str, Any]) -> int:
    # transformers reads id2label when present (num_labels is derived from it), else
    # num_labels, else defaults to 2.
    id2label = hf_config.get("id2label")
    num_labels = len(id2label) if id2label else hf_config.get("num_labels", 2)
    if hf_config.get("num_labels") not in (None, num_labels):
        raise ValueError(
            f"config.json num_labels={hf_config['num_labels']} disagrees with its id2label "
            f"({num_labels} labels); make them agree (a reward model has one label)"
        )
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"config.json num_labels={num_labels!r} must be a positive integer")
    return num_labels


# Folders --------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("pytorch_model*.bin"))


def _open_safetensors(path: Path) -> Any:
    try:
        # Reads and checks the header, and that the file holds every byte it lists.
        return safe_open(path, framework="pt")
    except Exception as err:  # noqa: BLE001 - SafetensorError is not importable
        raise ValueError(
            f"{path} cannot be read as safetensors ({err}): it is damaged or cut "
            "short; copy it again from the model's source"
        ) from err


def check_safetensors_file(path: str | os.PathLike) -> None:
    """ValueError naming `path` if it is not a complete safetensors file; reads its header."""
    with _open_safetensors(Path(path)):
        pass


def iter_hf_weights(folder: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of an HF folder, one file at a time."""
    folder = Path(folder)
    files = _weight_files(folder)
    if not files:
        raise ValueError(
            f"{folder} holds no weights (model.safetensors, model.safetensors.index.json or "
            "pytorch_model*.bin); point at a complete HF model folder"
        )
    for path in files:
        if path.suffix == ".safetensors":
            with _open_safetensors(path) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            try:
                # weights_only refuses arbitrary pickled objects: .bin files come from anywhere.
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise ValueError(
                    f"{path} holds objects other than tensors and is not unpickled for safety; "
                    "convert it to safetensors where its source is trusted"
                ) from err
            yield from state.items()


def read_hf_config(folder: str | os.PathLike) -> LlamaConfig:
    """Our config from `folder/config.json`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"HF model folder {folder} does not exist")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{folder} has no config.json; point at an HF model folder (as written by "
            "save_pretrained), not at a file or a parent folder"
        )
    hf = read_json_object(
        config_path, fix="it is damaged; copy config.json again from the model's source"
    )
    try:
        return config_from_hf(hf)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{config_path} is not a complete Llama config ({e})") from e


def load_hf_folder(folder: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, state dict in our names) from an HF `LlamaForCausalLM` or
    `LlamaForSequenceClassification` folder."""
    cfg = read_hf_config(folder)
    return cfg, _convert_from_hf(iter_hf_weights(folder), cfg, source=f"the weights in {folder}")


def single_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The one dtype of a model's tensors; ValueError if they mix dtypes."""
    found = set(dtypes)
    if len(found) != 1:
        raise ValueError(
            f"the state dict mixes dtypes {sorted(str(d) for d in found)}; pass dtype= "
            "(--dtype) to choose the one the HF model is saved in"
        )
    return found.pop()


def _plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for key, nbytes in sizes:
        # A tensor larger than the limit gets a shard of its own, as HF does.
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(key)
        shard_bytes += nbytes
    return shards


# safetensors' names of the dtypes an HF Llama is exported in.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _write_safetensors(
    path: Path,
    shapes: Mapping[str, torch.Size],
    dtype: torch.dtype,
    tensors: Iterator[torch.Tensor],
) -> None:
    """A safetensors file of tensors named and shaped as `shapes` (in that order), written one
    tensor at a time: the header (names, shapes, byte offsets) follows from the shapes alone,
    so each tensor's bytes are written as it arrives and none waits for the others."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    # transformers 4 refuses safetensors files whose metadata does not name the framework.
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        end = offset + math.prod(shape) * itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data 8-byte aligned, as safetensors writes it
    # A plain file: it gets the mode any file the user creates gets.
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))  # the format is little-endian, as x86 and ARM
        f.write(encoded)
        # Not zip(shapes, tensors): zip's reused result tuple would keep each tensor alive
        # while the next one is read.
        for name, shape in shapes.items():
            tensor = next(tensors)
            assert tensor.shape == shape and tensor.dtype == dtype, (name, tensor.shape)
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor  # freed before the next one is read


def prepare_output_folder(path: str | os.PathLike) -> tuple[Path, Path]:
    """(final path, temporary sibling to write into); ValueError if `path` holds anything.

    Writing into the sibling and renaming it when complete means an interrupted conversion
    never leaves a folder that looks finished.
    """
    path = Path(path).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(
            f"output {path} already exists and is not empty; pick another --out or delete it"
        )
    if not path.parent.is_dir():
        raise ValueError(f"the parent folder of output {path} does not exist; create it first")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return path, tmp


def finish_output_folder(tmp: Path, path: Path) -> None:
    """Move the completed temporary folder into place."""
    if path.is_dir():
        path.rmdir()  # empty, checked by prepare_output_folder
    tmp.rename(path)


def save_hf_folder(
    sd: Mapping[str, torch.Tensor],
    cfg: LlamaConfig,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `sd` (our names) as an HF folder at `path`: a `LlamaForCausalLM`, or for a config
    with `output_dim` (a reward model) a `LlamaForSequenceClassification`. dtype None keeps
    the tensors' own dtype. See `write_hf_folder`."""
    check_state_dict(sd, cfg, source="the llama_dist state dict")
    out_dtype = dtype if dtype is not None else single_dtype(t.dtype for t in sd.values())
    return write_hf_folder(
        sd.__getitem__, cfg, path, dtype=out_dtype, max_shard_bytes=max_shard_bytes
    )


def write_hf_folder(
    read: Callable[[str], torch.Tensor],
    cfg: LlamaConfig,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write the model of `cfg` as an HF folder at `path`, tensor by tensor: `read(key)` gives
    our tensor `key` (each name of `param_shapes(cfg)` once, in that order), which is
    converted, cast to `dtype` and written before the next is read, so one tensor at a time is
    in memory.

    config.json, generation_config.json (language models only) and safetensors weights: one
    `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` of at most
    `max_shard_bytes` (unless a single tensor is larger) with a
    `model.safetensors.index.json`. The folder is written under a temporary sibling name and
    renamed when complete.
    """
    hf_config = config_to_hf(cfg, dtype)
    shapes = param_shapes(cfg)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [(key, math.prod(shape) * itemsize) for key, shape in shapes.items()]
    shards = _plan_shards(sizes, max_shard_bytes)
    architecture = hf_architecture(cfg)

    def converted(keys: list[str]) -> Iterator[torch.Tensor]:
        for key in keys:  # holding no reference across the next read
            yield to_hf_tensor(key, read(key), cfg)[1].detach().to("cpu", dtype)

    path, tmp = prepare_output_folder(path)
    try:
        weight_map: dict[str, str] = {}
        for i, keys in enumerate(shards):
            name = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            hf_shapes = {to_hf_key(key, architecture=architecture): shapes[key] for key in keys}
            _write_safetensors(tmp / name, hf_shapes, dtype, converted(keys))
            weight_map.update(dict.fromkeys(hf_shapes, name))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if cfg.is_lm_head:  # a reward model does not generate
            generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        finish_output_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
