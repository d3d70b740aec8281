"""Convert between llama_dist checkpoints and Hugging Face `LlamaForCausalLM` folders (or
`LlamaForSequenceClassification` ones, for reward models).

    python launch/convert.py --from-hf HF_DIR --out CKPT_DIR [--dtype bf16|fp16|fp32]
    python launch/convert.py --to-hf CKPT_DIR --out HF_DIR [--dtype bf16|fp16|fp32]

--to-hf also accepts a folder of training `step-N` checkpoints and converts the newest complete
one. Without --dtype the weights keep the dtype they are stored in.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from llama_dist.checkpoint.model_io import load_model_checkpoint, save_model_checkpoint
from llama_dist.models.hf_adapter import load_hf_folder, save_hf_folder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
        cfg, state_dict = load_model_checkpoint(args.to_hf)
        out = save_hf_folder(state_dict, cfg, args.out, dtype=dtype)
        arch = "LlamaForCausalLM" if cfg.is_lm_head else "LlamaForSequenceClassification"
        kind = f"HF {arch} folder"
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
