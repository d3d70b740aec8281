"""Model-only DCP checkpoints and the `launch/convert.py` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from llama_dist.checkpoint import load_model_checkpoint, save_model_checkpoint
from llama_dist.checkpoint.convert import main
from llama_dist.models import Llama, LlamaConfig, RopeScaling

REPO = Path(__file__).resolve().parents[2]
CONVERT = REPO / "launch" / "convert.py"


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=256,
        ffn_hidden_dim=200,
        rope_theta=20000.0,
        max_seq_len=128,
        rope_scaling=RopeScaling(kind="linear", factor=2.0),
    ).validate()


def state_dict(cfg: LlamaConfig, seed: int, dtype: torch.dtype = torch.float32):
    model = Llama(cfg)
    model.init_weights(seed)
    return {k: t.to(dtype) for k, t in model.state_dict().items()}


def assert_bitwise_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_checkpoint_round_trip(tmp_path, dtype):
    assert not dist.is_initialized()  # single process, no process group
    cfg = tiny_config()
    sd = state_dict(cfg, seed=0, dtype=dtype)
    out = save_model_checkpoint(tmp_path / "ckpt", sd, cfg)
    assert (out / ".metadata").is_file() and (out / "model_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary sibling left

    cfg_back, back = load_model_checkpoint(out)
    assert cfg_back == cfg
    assert_bitwise_equal(back, sd)


def test_incomplete_checkpoints_are_rejected(tmp_path):
    cfg = tiny_config()
    out = save_model_checkpoint(tmp_path / "ckpt", state_dict(cfg, seed=0), cfg)

    (out / "model_config.json").rename(tmp_path / "model_config.json")
    with pytest.raises(ValueError, match="not a complete llama_dist checkpoint.*model_config"):
        load_model_checkpoint(out)

    (tmp_path / "model_config.json").rename(out / "model_config.json")
    (out / ".metadata").unlink()
    with pytest.raises(ValueError, match=r"not a complete llama_dist checkpoint.*\.metadata"):
        load_model_checkpoint(out)

    with pytest.raises(ValueError, match="does not exist"):
        load_model_checkpoint(tmp_path / "nowhere")

    with pytest.raises(ValueError, match="pick another --out or delete it"):
        save_model_checkpoint(out, state_dict(cfg, seed=0), cfg)


def test_checkpoint_of_another_config_is_rejected(tmp_path):
    cfg = tiny_config()
    out = save_model_checkpoint(tmp_path / "ckpt", state_dict(cfg, seed=0), cfg)
    bigger = cfg.replace(n_layers=3)
    (out / "model_config.json").write_text(json.dumps(bigger.to_dict()))
    with pytest.raises(ValueError, match="lacks 9 model tensors"):
        load_model_checkpoint(out)
    wider = cfg.replace(ffn_hidden_dim=256)
    (out / "model_config.json").write_text(json.dumps(wider.to_dict()))
    with pytest.raises(ValueError, match="does not belong to that config"):
        load_model_checkpoint(out)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_training_step_folders(tmp_path):
    """The newest complete step is read, and only its "model" entries."""
    cfg = tiny_config()
    config_json = json.dumps(cfg.to_dict())
    for step, seed in [(100, 1), (200, 2)]:
        folder = tmp_path / f"step-{step}"
        sd = state_dict(cfg, seed=seed)
        optimizer = {
            "state": {k: {"exp_avg": torch.zeros_like(t)} for k, t in sd.items()},
            "step": torch.tensor(step),
        }
        dcp.save({"model": sd, "optimizer": optimizer}, checkpoint_id=folder, no_dist=True)
        (folder / "model_config.json").write_text(config_json)
    # Unfinished saves: no .metadata yet, or still under a temporary name.
    unfinished = tmp_path / "step-300"
    unfinished.mkdir()
    (unfinished / "model_config.json").write_text(config_json)
    (tmp_path / "step-400.tmp").mkdir()

    cfg_back, back = load_model_checkpoint(tmp_path)
    assert cfg_back == cfg
    assert_bitwise_equal(back, state_dict(cfg, seed=2))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no complete step-N subfolder"):
        load_model_checkpoint(empty)


def run_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CONVERT), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_cli_round_trip(tmp_path):
    cfg = tiny_config()
    sd = state_dict(cfg, seed=3)
    ckpt = save_model_checkpoint(tmp_path / "ckpt", sd, cfg)

    to_hf = run_convert("--to-hf", str(ckpt), "--out", str(tmp_path / "hf"))
    assert to_hf.returncode == 0, to_hf.stderr
    assert to_hf.stderr == ""
    assert "wrote HF LlamaForCausalLM folder" in to_hf.stdout
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"]
    assert hf_config["torch_dtype"] == "float32" and hf_config["intermediate_size"] == 200

    from_hf = run_convert("--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert from_hf.returncode == 0, from_hf.stderr
    assert from_hf.stderr == ""
    cfg_back, back = load_model_checkpoint(tmp_path / "back")
    assert cfg_back == cfg
    assert_bitwise_equal(back, sd)


def test_cli_dtype_in_process(tmp_path, capsys):
    cfg = tiny_config()
    sd = state_dict(cfg, seed=4)
    save_model_checkpoint(tmp_path / "ckpt", sd, cfg)
    assert (
        main(["--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--dtype", "bf16"])
        == 0
    )
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16

    assert (
        main(
            ["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "fp32"), "--dtype", "fp32"]
        )
        == 0
    )
    _, back = load_model_checkpoint(tmp_path / "fp32")
    assert_bitwise_equal(back, {k: t.to(torch.bfloat16).float() for k, t in sd.items()})
    assert "wrote llama_dist checkpoint" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    result = run_convert("--from-hf", str(gpt2), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "this converts Llama models only" in lines[0]
    assert not (tmp_path / "out").exists()

    assert main(["--to-hf", str(gpt2), "--out", str(tmp_path / "out")]) == 2
    assert "not a complete llama_dist checkpoint" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:  # argparse: exactly one direction
        main(["--to-hf", "a", "--from-hf", "b", "--out", "c"])
    assert exit_info.value.code == 2
