"""Damaged and wrong input files, given to every command-line entry point.

Each case runs the real command in a subprocess with one input file spoiled in one way (cut
short, overwritten with garbage, invalid JSON, the wrong kind of file, a tokenizer other than
the data's) and requires what an operator needs: a non-zero exit, one line on stderr naming the
file and what is wrong, and no traceback.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama_dist.checkpoint.init import model_config_from_path
from llama_dist.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
WORDS = "the a cat dog sat ran on under mat log red blue small big quick slow".split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "."


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=timeout
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Intact inputs: two tokenizers, a corpus prepared with the first, a pretraining
    checkpoint and its Hugging Face export."""
    root = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(sentence(rng) for _ in range(400)) + "\n")
    tok = train_tokenizer([corpus], root / "tok.model", vocab_size=320, num_threads=1)
    other_text = root / "other.txt"
    other_text.write_text("\n".join(f"zq{i} xv{i * 7} wp{i % 13}" for i in range(400)) + "\n")
    other = train_tokenizer([other_text], root / "other.model", vocab_size=280, num_threads=1)
    out = run(
        "launch/prepare_data.py",
        *("--input", str(corpus), "--out", str(root / "data" / "corpus")),
        *("--tokenizer", str(tok), "--split", "paragraph", "--workers", "1", "--no-progress"),
    )
    assert out.returncode == 0, out.stderr
    run_dir = root / "run"
    out = run(
        "launch/pretrain.py",
        "model=debug",
        f"data.paths=[{root / 'data' / 'corpus'}]",
        f"tokenizer={tok}",
        "data.seq_len=32",
        "train.global_batch_tokens=128",
        "train.micro_batch=2",
        "train.steps=2",
        "train.eval_every=0",
        "train.wandb=false",
        "train.device=cpu",
        "optim.warmup_steps=1",
        "sample.prompts=[]",
        f"hydra.run.dir={run_dir}",
    )
    assert out.returncode == 0, out.stderr
    [step] = sorted((run_dir / "checkpoints").glob("step-*"))
    out = run("launch/convert.py", "--to-hf", str(step), "--out", str(root / "hf"))
    assert out.returncode == 0, out.stderr
    return {
        "root": root,
        "corpus_txt": corpus,
        "tok": tok,
        "other_tok": other,
        "data": root / "data" / "corpus",
        "ckpt": step,
        "hf": root / "hf",
    }


def copy_input(path: Path, dest: Path) -> Path:
    """A copy of an input file, or of a dataset prefix's files, or of a folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.copytree(path, dest)
    elif path.is_file():
        shutil.copy(path, dest)
    else:  # a dataset prefix
        for suffix in (".bin", ".idx", ".meta.json"):
            shutil.copy(str(path) + suffix, str(dest) + suffix)
    return dest


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def garble(path: Path) -> None:
    path.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(path.stat().st_size)))


def bad_json(path: Path) -> None:
    path.write_text('{"dim": 128,\n')


def assert_one_clear_line(out: subprocess.CompletedProcess, *names: str) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "error" in ln.lower()]
    assert lines, out.stderr
    line = lines[-1]
    for name in names:
        assert name in line, (name, out.stderr)
    return line


def pretrain(inputs, tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    base = {
        "model": "debug",
        "data.paths": f"[{inputs['data']}]",
        "tokenizer": str(inputs["tok"]),
        "data.seq_len": "32",
        "train.global_batch_tokens": "128",
        "train.micro_batch": "2",
        "train.steps": "2",
        "train.eval_every": "0",
        "train.wandb": "false",
        "train.device": "cpu",
        "optim.warmup_steps": "1",
        "hydra.run.dir": str(tmp / "run"),
    }
    for item in overrides:
        key, value = item.split("=", 1)
        base[key] = value
    return run("launch/pretrain.py", *(f"{k}={v}" for k, v in base.items()))


# pretrain ----------------------------------------------------------------------------------


def test_pretrain_refuses_a_tokenizer_other_than_the_datas_before_the_first_step(inputs, tmp_path):
    out = pretrain(inputs, tmp_path, f"tokenizer={inputs['other_tok']}")
    line = assert_one_clear_line(out, "corpus", "another tokenizer", "other.model")
    assert "tok.model" in line  # the tokenizer the data was prepared with
    assert out.returncode == 2
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before any step


@pytest.mark.parametrize(
    ("suffix", "spoil", "problem"),
    [
        (".bin", truncate, "corpus"),
        (".idx", garble, "corpus.idx"),
        (".meta.json", bad_json, "corpus.meta.json"),
    ],
)
def test_pretrain_names_a_damaged_dataset_file(inputs, tmp_path, suffix, spoil, problem):
    data = copy_input(inputs["data"], tmp_path / "data" / "corpus")
    spoil(Path(str(data) + suffix))
    out = pretrain(inputs, tmp_path, f"data.paths=[{data}]")
    assert_one_clear_line(out, problem)
    assert out.returncode == 2


def test_pretrain_names_a_damaged_tokenizer(inputs, tmp_path):
    tok = copy_input(inputs["tok"], tmp_path / "tok.model")
    bad_json(tok)
    problem = "tok.model"
    out = pretrain(inputs, tmp_path, f"tokenizer={tok}")
    assert_one_clear_line(out, problem, "not a SentencePiece model")


def test_pretrain_names_a_damaged_init_from_checkpoint(inputs, tmp_path):
    ckpt = copy_input(inputs["ckpt"], tmp_path / "ckpt")
    bad_json(ckpt / "model_config.json")
    out = pretrain(inputs, tmp_path, f"checkpoint.init_from={ckpt}")
    assert_one_clear_line(out, "model_config.json", "not valid JSON")


def test_pretrain_names_a_damaged_model_config_file(inputs, tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 128, "num_hidden_layers": ')
    out = pretrain(inputs, tmp_path, f"model.from_file={config}")
    assert_one_clear_line(out, "config.json", "not valid JSON")


# prepare_data ------------------------------------------------------------------------------


def test_prepare_names_a_damaged_tokenizer_and_a_binary_input(inputs, tmp_path):
    tok = copy_input(inputs["tok"], tmp_path / "tok.model")
    truncate(tok)
    args = ["--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"]
    out = run("launch/prepare_data.py", "--input", str(inputs["corpus_txt"]), "--tokenizer",
              str(tok), *args)  # fmt: skip
    assert_one_clear_line(out, "tok.model", "not a SentencePiece model")

    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)) * 64)
    out = run(
        "launch/prepare_data.py", "--input", str(binary), "--tokenizer", str(inputs["tok"]), *args
    )
    assert_one_clear_line(out, "binary.txt", "UTF-8")
    assert not list(tmp_path.glob("out*"))


# convert -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "spoil", "problem"),
    [
        ("config.json", bad_json, "not valid JSON"),
        ("model.safetensors", truncate, "model.safetensors"),
    ],
)
def test_convert_names_a_damaged_hf_file(inputs, tmp_path, file, spoil, problem):
    hf = copy_input(inputs["hf"], tmp_path / "hf")
    spoil(hf / file)
    out = run("launch/convert.py", "--from-hf", str(hf), "--out", str(tmp_path / "out"))
    assert_one_clear_line(out, file, problem)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("file", "spoil", "problem"),
    [
        ("__0_0.distcp", truncate, "__0_0.distcp"),
        ("model_config.json", bad_json, "not valid JSON"),
        (".metadata", truncate, ".metadata"),
    ],
)
def test_convert_and_generate_name_a_damaged_checkpoint_file(
    inputs, tmp_path, file, spoil, problem
):
    ckpt = copy_input(inputs["ckpt"], tmp_path / "ckpt")
    spoil(ckpt / file)
    out = run("launch/convert.py", "--to-hf", str(ckpt), "--out", str(tmp_path / "out"))
    assert_one_clear_line(out, file, problem)
    assert not (tmp_path / "out").exists()
    out = run(
        "launch/generate.py",
        *("--checkpoint", str(ckpt), "--tokenizer", str(inputs["tok"]), "--prompt", "the cat"),
        *("--max-new-tokens", "4"),
    )
    assert_one_clear_line(out, file, problem)


def test_generate_names_a_damaged_tokenizer(inputs, tmp_path):
    tok = copy_input(inputs["tok"], tmp_path / "tok.model")
    garble(tok)
    out = run(
        "launch/generate.py",
        *("--checkpoint", str(inputs["ckpt"]), "--tokenizer", str(tok), "--prompt", "the cat"),
    )
    assert_one_clear_line(out, "tok.model", "not a SentencePiece model")


# plan, dry_run -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"hidden_size": 4096, ', "not valid JSON"),
        ('{"dim": 4096, "n_layers": 32, "n_heads": 31}', "not a valid model config"),
    ],
)
def test_plan_and_dry_run_name_a_damaged_model_config(inputs, tmp_path, content, problem):
    config = tmp_path / "model.json"
    config.write_text(content)
    out = run("launch/plan.py", f"model.from_file={config}", "cluster.gpus=16")
    assert_one_clear_line(out, "model.json", problem)
    out = run("launch/dry_run.py", "--model", str(config), "--world-size", "16", "--tp", "2")
    assert_one_clear_line(out, "model.json", problem)


def test_a_json_array_is_not_a_model_config(tmp_path):
    config = tmp_path / "model.json"
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"model\.json holds a JSON list, not an object"):
        model_config_from_path(config)


def test_plan_and_dry_run_read_a_model_config_file(inputs, tmp_path):
    """The intact export's config.json plans like the model it describes."""
    config = inputs["hf"] / "config.json"
    out = run("launch/dry_run.py", "--model", str(config), "--world-size", "4", "--tp", "2")
    assert out.returncode == 0, out.stderr
    preset = run("launch/dry_run.py", "--model", "debug", "--world-size", "4", "--tp", "2")
    assert out.stdout.splitlines()[1:] == preset.stdout.splitlines()[1:]


# benchmarks --------------------------------------------------------------------------------


def test_benchmarks_name_a_damaged_input(inputs, tmp_path):
    tok = copy_input(inputs["tok"], tmp_path / "tok.model")
    truncate(tok)
    out = run("benchmarks/ppo.py", "--tokenizer", str(tok), "--world-size", "1")
    assert_one_clear_line(out, "tok.model", "not a SentencePiece model")
    config = tmp_path / "model.json"
    bad_json(config)
    out = run("benchmarks/mfu.py", "--model-file", str(config))
    assert_one_clear_line(out, "model.json", "not valid JSON")
