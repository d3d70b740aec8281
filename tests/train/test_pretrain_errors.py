"""Bad input to the pretraining job: each a clear error before any training starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch.distributed as dist
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError
from pretrain_helpers import ROOT, job, write_corpus

from llama_dist.checkpoint import save_model_checkpoint
from llama_dist.data.prepare import write_token_dataset
from llama_dist.models import Llama, get_preset
from llama_dist.train.pretrain import pretrain


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "synthetic")


def expect_error_before_training(cfg, tmp_path, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pretrain(cfg, tmp_path / "run")
    # Raised before a process group, a run folder or a model existed.
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()


def test_unknown_key_and_wrong_type_fail_composition(corpus):
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="stepz"):
        job(corpus, "train.stepz=3")
    with pytest.raises((ConfigCompositionException, ValidationError), match="steps"):
        job(corpus, "train.steps=many")


def test_cli_reports_unknown_key(corpus):
    out = subprocess.run(
        [sys.executable, "launch/pretrain.py", "model=debug", "train.stepz=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "stepz" in out.stderr


def test_cli_reports_a_bad_value_with_exit_2(corpus):
    out = subprocess.run(
        [
            sys.executable,
            "launch/pretrain.py",
            "model=debug",
            f"data.paths=[{corpus}]",
            "data.seq_len=32",
            "train.global_batch_tokens=100",
            "train.device=cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "pretrain: error: train.global_batch_tokens=100 is not a multiple" in out.stderr


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["train.global_batch_tokens=96"], r"global batch of 3 sequences .* not divisible"),
        (["optim.warmup_steps=50"], r"optim.warmup_steps=50 must be in \[0, train.steps=10\)"),
        (["parallel.tp=3"], r"world size 1 is not divisible"),
        (["model.n_kv_heads=3"], r"not divisible by model.n_kv_heads=3"),
        (["model=eightb"], None),
    ],
)
def test_bad_values(corpus, tmp_path, overrides, match):
    if match is None:  # an unknown preset file is a composition error naming the choices
        with pytest.raises(ConfigCompositionException, match="eightb"):
            job(corpus, *overrides)
        return
    expect_error_before_training(job(corpus, *overrides), tmp_path, match)


def test_missing_data_path(tmp_path):
    cfg = job(tmp_path / "nowhere")
    expect_error_before_training(cfg, tmp_path, r"nowhere.*prepare_data")


def test_truncated_bin(tmp_path):
    prefix = write_corpus(tmp_path / "cut")
    data = (tmp_path / "cut.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    expect_error_before_training(job(prefix), tmp_path, r"truncated|size")


def test_token_id_beyond_vocab(tmp_path):
    prefix = tmp_path / "big"
    write_token_dataset(prefix, [list(range(3, 3000)) + [2]] * 2, vocab_size=4096)
    expect_error_before_training(job(prefix), tmp_path, r"2999.*vocab")


def test_empty_corpus(tmp_path):
    prefix = tmp_path / "empty"
    write_token_dataset(prefix, [], vocab_size=2048)
    expect_error_before_training(job(prefix), tmp_path, r"empty|no token")


def test_checkpoint_of_another_shape(corpus, tmp_path):
    other = get_preset("debug", dim=64)
    model = Llama(other)
    model.init_weights(0)
    save_model_checkpoint(tmp_path / "other", model.state_dict(), other)
    cfg = job(corpus, f"checkpoint.init_from={tmp_path / 'other'}")
    expect_error_before_training(cfg, tmp_path, r"another shape: dim=64 \(this model: 128\)")


def test_tokenizer_larger_than_model_vocab(corpus, tmp_path):
    from llama_dist.tokenizer import train_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"w{i} x{i % 97} y{i % 89} {i * 7}" for i in range(20000)))
    tok = train_tokenizer([text], tmp_path / "t.model", vocab_size=275)
    cfg = job(corpus, f"tokenizer={tok}", "model.vocab_size=256")
    expect_error_before_training(cfg, tmp_path, r"275 pieces but model.vocab_size=256")
