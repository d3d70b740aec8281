"""Convert between llama_dist checkpoints and Hugging Face `LlamaForCausalLM` folders (or
`LlamaForSequenceClassification` ones, for reward models).

    python launch/convert.py --from-hf HF_DIR --out CKPT_DIR [--dtype bf16|fp16|fp32]
    python launch/convert.py --to-hf CKPT_DIR --out HF_DIR [--dtype bf16|fp16|fp32]
        [--max-shard-size 5GiB]

--to-hf also accepts a folder of training `step-N` checkpoints and converts the newest complete
one. It streams: each tensor is read from the checkpoint alone and written to its safetensors
shard before the next is read, so the process holds one tensor, whatever the model's size.
Without --dtype the weights keep the dtype they are stored in.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from llama_dist.checkpoint.model_io import (
    read_model_metadata,
    read_model_tensor,
    save_model_checkpoint,
)
from llama_dist.models.config import LlamaConfig
from llama_dist.models.hf_adapter import (
    hf_architecture,
    load_hf_folder,
    param_shapes,
    single_dtype,
    write_hf_folder,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """The bytes in a size such as "5GiB", "500MB" or "100000": kB, MB and GB are decimal, as
    in HF's max_shard_size; KiB, MiB and GiB binary."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"--max-shard-size {text!r} is not a size; give bytes or e.g. 500MB, 5GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def export_hf_folder(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> tuple[LlamaConfig, Path]:
    """Write the llama_dist checkpoint at `checkpoint` (or the newest of a folder of step-N
    checkpoints) as an HF folder at `out`, one tensor at a time: each is read from the
    checkpoint alone (DCP, this process only), converted and written to its safetensors shard
    before the next is read. dtype None keeps the stored dtype."""
    folder, cfg, stored = read_model_metadata(checkpoint)
    out_dtype = dtype if dtype is not None else single_dtype(stored.values())
    shapes = param_shapes(cfg)

    def read(name: str) -> torch.Tensor:
        return read_model_tensor(folder, name, shapes[name], stored[name])

    path = write_hf_folder(read, cfg, out, dtype=out_dtype, max_shard_bytes=max_shard_bytes)
    return cfg, path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert between llama_dist checkpoints and Hugging Face Llama folders.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-hf",
        metavar="HF_DIR",
        help="HF LlamaForCausalLM (or ...ForSequenceClassification) folder to import",
    )
    source.add_argument("--to-hf", metavar="CKPT_DIR", help="llama_dist checkpoint to export")
    parser.add_argument("--out", required=True, help="folder to create; must not hold anything")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights to this dtype")
    parser.add_argument(
        "--max-shard-size",
        default="5GiB",
        help="--to-hf: largest safetensors file (e.g. 500MB, 5GiB; default 5GiB); a larger "
        "model is split into model-0000k-of-0000n.safetensors files with an index",
    )
    return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> str:
    """Run one conversion; returns a line describing what was written."""
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.from_hf:
        cfg, state_dict = load_hf_folder(args.from_hf)
        if dtype is not None:
            state_dict = {k: t.to(dtype) for k, t in state_dict.items()}
        out = save_model_checkpoint(args.out, state_dict, cfg)
        kind = "llama_dist checkpoint"
    else:
        max_shard_bytes = parse_size(args.max_shard_size)
        cfg, out = export_hf_folder(
            args.to_hf, args.out, dtype=dtype, max_shard_bytes=max_shard_bytes
        )
        kind = f"HF {hf_architecture(cfg)} folder"
    return f"wrote {kind} {out} ({cfg.num_params():,} parameters)"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        message = convert(args)
    except ValueError as err:
        print(f"convert.py: error: {err}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
