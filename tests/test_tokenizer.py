"""The sentencepiece tokenizer: a trained Llama-2-style model and the Llama-layout reference file.

Facts checked against ../shared/docs/llama2.md, "Architecture": vocabulary 32,000, BPE, digits
split, unknown UTF-8 falls back to bytes, ids unk 0, bos 1, eos 2, no pad.
"""

from __future__ import annotations

import importlib.resources
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from llama_dist.tokenizer import LLAMA2_TRAINER_SETTINGS, Tokenizer, main, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
# Mistral's v1 tokenizer has Llama 2's exact layout and trainer settings; it ships in a wheel,
# so the tests need no download.
REFERENCE_MODEL = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"

WORDS = (
    "the of and to in is was for that with as on by at from his her they which one all were "
    "when we there can an your more would their what about many then them these some time "
    "people water words number could way first may down side been now find long day did get "
    "come made part over new sound take only little work know place year live back give most "
    "very after thing our just name good sentence man think say great where help through much "
    "before line right too mean old any same tell boy follow came want show also around form "
    "three small set put end does another well large must big even such because turn here why "
    "ask went men read need land different home us move try kind hand picture again change off "
    "play spell air away animal house point page letter mother answer found study still learn "
    "should world high every near add food between own below country plant last school father "
    "keep tree never start city earth eye light thought head under story saw left few while "
    "along might close something seem next hard open example begin life always those both paper "
    "together got group often run important until children side feet car mile night walk white "
    "café naïve résumé Zürich señor façade smörgåsbord Καλημέρα κόσμε Привет мир 東京 日本語"
).split()
PUNCT = (".", ".", ".", ",", "!", "?", ";", ":")


def make_corpus(num_lines: int, seed: int = 0) -> str:
    """Deterministic English-like text with numbers, accents, other scripts and emoji."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 30))]
        for _ in range(rng.randint(0, 3)):
            number = rng.choice([rng.randint(0, 99), rng.randint(100, 99999), rng.random() * 1e3])
            words.insert(
                rng.randrange(len(words) + 1), f"{number:.2f}" if number % 1 else str(number)
            )
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words) + 1), rng.choice(["😀", "🚀", "👍🏽"]))
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(PUNCT))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus(2000), encoding="utf-8")
    assert 200_000 < path.stat().st_size < 600_000
    return path


@pytest.fixture(scope="module")
def trained_path(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    assert train_tokenizer([corpus_file], out, vocab_size=1000, num_threads=1) == out
    return out


@pytest.fixture(scope="module")
def trained(trained_path: Path) -> Tokenizer:
    return Tokenizer(trained_path)


@pytest.fixture(scope="module")
def reference() -> Tokenizer:
    return Tokenizer(REFERENCE_MODEL)


def _spec(path: Path) -> dict[str, object]:
    """The model file's settings under the names `LLAMA2_TRAINER_SETTINGS` uses."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    values: dict[str, object] = {}
    for key in LLAMA2_TRAINER_SETTINGS:
        if key == "model_type":
            values[key] = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)
        elif key == "normalization_rule_name":
            values[key] = normalizer.name
        elif key in ("add_dummy_prefix", "remove_extra_whitespaces"):
            values[key] = getattr(normalizer, key)
        else:
            values[key] = getattr(trainer, key)
    return values


ROUND_TRIP = [
    "",
    "Hello world",
    " one leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple   inner    spaces",
    "tabs\tand\nnew\nlines\n\n",
    "Digits 0123456789 and 3.14159, 1,000,000 and -42",
    "Accents: café naïve Zürich; Greek Καλημέρα; Cyrillic Привет; CJK 東京",
    "Emoji 😀🚀👍🏽 and a rare ꙮ glyph and a rare 𓀀 hieroglyph",
    "[INST] <<SYS>>\nplain text markup\n<</SYS>>\n\n [/INST]",
    "\u2047 looks like unk but is text",
]


# A trained model ------------------------------------------------------------------------------
def test_special_ids(trained: Tokenizer) -> None:
    assert trained.vocab_size == 1000
    assert (trained.unk_id, trained.bos_id, trained.eos_id, trained.pad_id) == (0, 1, 2, None)
    assert [trained.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert trained.byte_fallback


def test_written_settings_match_reference_file(trained_path: Path) -> None:
    trained = _spec(trained_path)
    # The file stores character_coverage as a float32.
    assert trained == pytest.approx(LLAMA2_TRAINER_SETTINGS | {"model_type": "BPE"})
    assert trained == _spec(REFERENCE_MODEL)
    assert trained["normalization_rule_name"] == "identity"
    assert trained["split_digits"] and trained["byte_fallback"]
    assert trained_path.with_suffix(".vocab").is_file()
    assert sorted(p.name for p in trained_path.parent.iterdir()) == [
        "tokenizer.model",
        "tokenizer.vocab",
    ]


def test_same_seed_same_model(corpus_file: Path, trained: Tokenizer, tmp_path: Path) -> None:
    again = Tokenizer(
        train_tokenizer([corpus_file], tmp_path / "t.model", vocab_size=1000, num_threads=1)
    )
    pieces = [trained.id_to_piece(i) for i in range(trained.vocab_size)]
    assert [again.id_to_piece(i) for i in range(again.vocab_size)] == pieces


def test_digits_are_split(trained: Tokenizer) -> None:
    text = "In 2023 they counted 1234567 birds, 3.75 per tree and 10000 at 12:45"
    pieces = [trained.id_to_piece(i) for i in trained.encode(text, bos=False)]
    with_digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert "".join(with_digits) == "20231234567375100001245"
    assert all(len(p) == 1 for p in with_digits), with_digits


def test_byte_fallback(trained: Tokenizer) -> None:
    # U+A66E is nowhere in the corpus, so it must become its three UTF-8 bytes, not unk.
    ids = trained.encode("ꙮ", bos=False)
    pieces = [trained.id_to_piece(i) for i in ids]
    assert pieces[-3:] == ["<0xEA>", "<0x99>", "<0xAE>"]
    assert trained.unk_id not in ids
    assert trained.decode(ids) == "ꙮ"


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(trained: Tokenizer, reference: Tokenizer, text: str) -> None:
    for tok in (trained, reference):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, bos=False, eos=True)) == text
        assert tok.unk_id not in tok.encode(text)


def test_corpus_round_trip(trained: Tokenizer) -> None:
    lines = make_corpus(200, seed=1).splitlines()
    assert [trained.decode(ids) for ids in trained.encode_batch(lines)] == lines


def test_bos_eos_flags(trained: Tokenizer) -> None:
    body = trained.encode("some text", bos=False)
    assert trained.bos_id not in body and trained.eos_id not in body
    assert trained.encode("some text") == [1, *body]
    assert trained.encode("some text", eos=True) == [1, *body, 2]
    assert trained.encode("some text", bos=False, eos=True) == [*body, 2]
    assert trained.encode("", bos=False) == []


def test_encode_batch_matches_encode(trained: Tokenizer) -> None:
    for bos, eos in [(True, False), (False, True), (True, True)]:
        expected = [trained.encode(t, bos=bos, eos=eos) for t in ROUND_TRIP]
        assert trained.encode_batch(ROUND_TRIP, bos=bos, eos=eos, num_threads=2) == expected
        assert trained.encode_batch(tuple(ROUND_TRIP), bos=bos, eos=eos) == expected


def test_decode_tensor(trained: Tokenizer) -> None:
    ids = trained.encode("a tensor of ids 42", eos=True)
    assert trained.decode(torch.tensor(ids)) == "a tensor of ids 42"
    with pytest.raises(ValueError, match="1-D"):
        trained.decode(torch.tensor([ids, ids]))
    with pytest.raises(TypeError, match="encode_batch"):
        trained.encode(["a", "list"])  # type: ignore[arg-type]


# The Llama-layout reference file --------------------------------------------------------------
def test_reference_layout(reference: Tokenizer) -> None:
    assert reference.vocab_size == 32000
    assert (reference.unk_id, reference.bos_id, reference.eos_id) == (0, 1, 2)
    assert reference.pad_id is None
    assert reference.byte_fallback


def test_reference_known_encoding(reference: Tokenizer) -> None:
    text = "Hello world 2024"
    ids = reference.encode(text, eos=True)
    direct = spm.SentencePieceProcessor(model_file=str(REFERENCE_MODEL))
    assert ids == [1, *direct.encode(text), 2]
    assert [reference.id_to_piece(i) for i in ids] == [
        "<s>",
        "▁Hello",
        "▁world",
        "▁",
        "2",
        "0",
        "2",
        "4",
        "</s>",
    ]
    assert ids == [1, 22557, 1526, 28705, 28750, 28734, 28750, 28781, 2]
    # Runs of leading spaces are where transformers' Llama tokenizers disagree (cpu-notes 8).
    assert reference.encode("   x", bos=False) == direct.encode("   x")
    assert reference.decode(ids) == text


# Bad input ------------------------------------------------------------------------------------
def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist.*train_tokenizer"):
        Tokenizer(tmp_path / "tokenizer.model")


@pytest.mark.parametrize("content", ["just some text\n", '{"model": {"type": "BPE"}}'])
def test_not_a_sentencepiece_model(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_text(content)
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        Tokenizer(path)


def test_vocab_too_small(corpus_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"vocab_size=259 is too small.*>= 260"):
        train_tokenizer([corpus_file], tmp_path / "t.model", vocab_size=259)


def test_vocab_too_small_for_characters(corpus_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="raise vocab_size"):
        train_tokenizer([corpus_file], tmp_path / "t.model", vocab_size=270, num_threads=1)


def test_corpus_too_small_for_vocab(tmp_path: Path) -> None:
    corpus = tmp_path / "small.txt"
    corpus.write_text("a tiny corpus with few words\n" * 20)
    out = tmp_path / "out" / "tokenizer.model"
    with pytest.raises(ValueError, match="lower vocab_size or give more text"):
        train_tokenizer([corpus], out, vocab_size=5000, num_threads=1)
    # Nothing, not even a temporary folder, is left behind by a failed run.
    assert list(out.parent.iterdir()) == []


def test_bad_corpus_files(tmp_path: Path) -> None:
    out = tmp_path / "tokenizer.model"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n")
    with pytest.raises(ValueError, match="no input files"):
        train_tokenizer([], out, vocab_size=1000)
    with pytest.raises(ValueError, match="do not exist"):
        train_tokenizer([empty, tmp_path / "missing.txt"], out, vocab_size=1000)
    with pytest.raises(ValueError, match="is empty"):
        train_tokenizer([empty], out, vocab_size=1000)
    with pytest.raises(ValueError, match="no non-empty lines"):
        train_tokenizer([blank], out, vocab_size=1000, num_threads=1)
    with pytest.raises(ValueError, match="must name the .model file"):
        train_tokenizer([blank], tmp_path / "tokenizer", vocab_size=1000)
    assert not out.exists()


# Command line ---------------------------------------------------------------------------------
def test_cli(corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok" / "tokenizer.model"
    result = subprocess.run(
        [
            sys.executable,
            "launch/train_tokenizer.py",
            "--input",
            str(corpus_file),
            "--out",
            str(out),
            "--vocab-size",
            "500",
            "--threads",
            "1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert Tokenizer(out).vocab_size == 500


def test_cli_error_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--input",
                str(tmp_path / "missing.txt"),
                "--out",
                str(tmp_path / "t.model"),
                "--vocab-size",
                "1000",
            ]
        )
    assert exit_info.value.code == 2
    assert "do not exist" in capsys.readouterr().err
