"""Fixtures of the lm-eval tests: the tiny model's files, and both harness models over it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_helpers import MAX_SEQ_LEN, SentencePieceHFTokenizer, make_files
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM

from llama_dist.evaluation import LlamaDistLM


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_files(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="session")
def ours(files) -> LlamaDistLM:
    return LlamaDistLM(
        checkpoint=str(files["ckpt"]),
        tokenizer=str(files["tokenizer"]),
        batch_size=3,
        device="cpu",
    )


@pytest.fixture(scope="session")
def hf_tokenizer(files) -> SentencePieceHFTokenizer:
    return SentencePieceHFTokenizer(
        vocab_file=str(files["tokenizer"]),
        legacy=True,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        special_tokens_pattern="bos",
    )


@pytest.fixture(scope="session")
def theirs(files, hf_tokenizer) -> HFLM:
    model = AutoModelForCausalLM.from_pretrained(files["hf"], dtype=torch.float32).eval()
    return HFLM(
        pretrained=model,
        tokenizer=hf_tokenizer,
        batch_size=3,
        max_length=MAX_SEQ_LEN,
        add_bos_token=True,
        device="cpu",
    )
