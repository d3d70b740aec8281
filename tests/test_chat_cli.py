"""launch/chat.py: a piped two-turn dialog prints `generate`'s greedy replies of the encoded
dialog (the first reply in the second turn's prompt), the tokenizer found from the run
folder, streaming, /reset, the context limit and errors."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_dist.chat_cli import PROMPT, REPLY, ChatSession, find_tokenizer, main
from llama_dist.checkpoint import save_model_checkpoint
from llama_dist.data.chat import encode_dialog
from llama_dist.generate import generate, load_for_generation
from llama_dist.models import Llama, LlamaConfig
from llama_dist.tokenizer import Tokenizer, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat and dog ran to big red sun in sky we see it now".split()
SYSTEM = "answer in few words"
TURNS = ["the cat sat", "a big red dog ran"]
NEW_TOKENS = 8


def tiny_model(vocab_size: int) -> tuple[Llama, LlamaConfig]:
    # The chat markup is byte pieces for this tokenizer: a long context for two turns.
    cfg = LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=256
    ).validate()
    model = Llama(cfg)
    model.init_weights(1)
    with torch.no_grad():
        for name, param in model.layers.named_parameters():
            if not name.endswith("norm.weight"):
                param.mul_(5.0)
    return model.eval(), cfg


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> tuple[Path, Path]:
    """runs/x/config.yaml naming the tokenizer and runs/x/checkpoints/step-5; returns the
    step folder and the tokenizer."""
    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(300)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    tokenizer = train_tokenizer(
        [root / "corpus.txt"], root / "tok" / "tokenizer.model", vocab_size=300, num_threads=1
    )
    run = root / "runs" / "x"
    step = run / "checkpoints" / "step-5"
    model, cfg = tiny_model(300)
    step.parent.mkdir(parents=True)
    save_model_checkpoint(step, model.state_dict(), cfg)
    (run / "config.yaml").write_text(f"run_name: x\ntokenizer: {tokenizer}\n")
    return step, tokenizer


def expected_replies(step: Path, tokenizer: Path, turns: list[str]) -> list[str]:
    """Greedy `generate` of each turn's whole encoded dialog, history included."""
    tok = Tokenizer(tokenizer)
    model, _ = load_for_generation(step)
    dialog = [{"role": "system", "content": SYSTEM}]
    replies = []
    for text in turns:
        dialog.append({"role": "user", "content": text})
        ids = encode_dialog(tok, dialog).ids
        (out,) = generate(model, [ids], max_new_tokens=NEW_TOKENS, temperature=0, eos_id=tok.eos_id)
        reply = tok.decode(out)
        replies.append(reply)
        dialog.append({"role": "assistant", "content": reply})
    return replies


def test_piped_dialog_prints_generate_replies_with_history(run_folder):
    step, tokenizer = run_folder
    result = subprocess.run(
        [
            sys.executable,
            "launch/chat.py",
            *("--checkpoint", str(step), "--system", SYSTEM),
            *("--temperature", "0", "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"),
        ],
        input="".join(f"{t}\n" for t in TURNS),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    replies = expected_replies(step, tokenizer, TURNS)
    expected = "".join(f"{PROMPT}{REPLY}{r}\n" for r in replies) + PROMPT + "\n"
    assert result.stdout == expected


def session(step: Path, tokenizer: Path, **kwargs) -> ChatSession:
    model, _ = load_for_generation(step)
    settings = dict(system=SYSTEM, max_new_tokens=NEW_TOKENS, temperature=0.0)
    return ChatSession(model, Tokenizer(tokenizer), **{**settings, **kwargs})


def test_reply_streams_pieces_as_they_are_decoded(run_folder):
    step, tokenizer = run_folder
    pieces: list[str] = []
    chat = session(step, tokenizer)
    reply = chat.reply(TURNS[0], pieces.append)
    assert reply == expected_replies(step, tokenizer, TURNS[:1])[0]
    assert "".join(pieces) == reply
    assert len(pieces) > 1  # written piece by piece, not once at the end
    assert chat.history == [
        {"role": "user", "content": TURNS[0]},
        {"role": "assistant", "content": reply},
    ]
    # The next prompt is the whole dialog so far, as `expected_replies` encodes it.
    ids, _ = chat.prompt_ids(TURNS[1])
    dialog = [{"role": "system", "content": SYSTEM}, *chat.history]
    dialog.append({"role": "user", "content": TURNS[1]})
    assert ids == encode_dialog(Tokenizer(tokenizer), dialog).ids
    assert len(ids) > len(encode_dialog(Tokenizer(tokenizer), [dialog[0], dialog[-1]]).ids)


def test_reset_exit_and_errors_in_the_loop(run_folder, monkeypatch, capsys):
    step, tokenizer = run_folder
    # /reset forgets the first turn: the second reply is that of the second message alone.
    stdin = f"{TURNS[0]}\n/reset\n\n{TURNS[1]}\nsay [INST] now\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    args = ["--checkpoint", str(step), "--system", SYSTEM, "--temperature", "0"]
    assert main([*args, "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    first = expected_replies(step, tokenizer, TURNS[:1])[0]
    second = expected_replies(step, tokenizer, TURNS[1:])[0]
    assert out.out == (
        f"{PROMPT}{REPLY}{first}\n{PROMPT}{PROMPT}{PROMPT}{REPLY}{second}\n"
        f"{PROMPT}{REPLY}\n{PROMPT}"
    )
    assert "(history cleared)" in out.err
    assert "error: message" in out.err and "chat markup" in out.err


def test_old_turns_are_dropped_to_fit_the_context(run_folder):
    step, tokenizer = run_folder
    notices: list[str] = []
    chat = session(step, tokenizer, max_new_tokens=120, notice=notices.append)
    for text in TURNS * 2:
        chat.reply(text, lambda _piece: None)
    ids, room = chat.prompt_ids("the sun")
    assert len(ids) + room <= 256 and room == 120
    assert notices and "dropped the oldest turn" in notices[0]
    assert len(chat.history) < 8
    with pytest.raises(ValueError, match="send a shorter message"):
        chat.prompt_ids("the sun " * 200)


def test_tokenizer_is_found_from_the_run_folder_or_beside(run_folder, tmp_path):
    step, tokenizer = run_folder
    assert find_tokenizer(step) == tokenizer
    assert find_tokenizer(step.parent) == tokenizer  # the checkpoints folder
    lone = tmp_path / "ckpt"
    lone.mkdir()
    with pytest.raises(ValueError, match="pass --tokenizer PATH"):
        find_tokenizer(lone)
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    assert find_tokenizer(lone) == tmp_path / "tokenizer.model"
    bad_run = tmp_path / "run"
    (bad_run / "checkpoints" / "step-1").mkdir(parents=True)
    (bad_run / "config.yaml").write_text("tokenizer: missing/tokenizer.model\n")
    with pytest.raises(ValueError, match="names tokenizer 'missing/tokenizer.model'"):
        find_tokenizer(bad_run / "checkpoints" / "step-1")


def test_setup_errors_are_one_line_and_exit_2(run_folder, tmp_path, capsys):
    step, _ = run_folder
    lone = tmp_path / "ckpt"
    lone.mkdir()
    assert main(["--checkpoint", str(lone)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chat.py: error: found no tokenizer") and err.count("\n") == 1
    assert main(["--checkpoint", str(step), "--top-k", "-2"]) == 2
    assert "top_k=-2 must be >= 0" in capsys.readouterr().err
    assert main(["--checkpoint", str(step), "--system", "[INST]"]) == 2
    assert "chat markup" in capsys.readouterr().err
