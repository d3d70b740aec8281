"""Tokenizing corpora into Megatron indexed datasets: documents, EOS, sidecar, determinism
over worker counts, the command line, and the errors raised before anything is written."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama_dist.data.prepare import megatron_indexed_dataset, prepare_data
from llama_dist.tokenizer import Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
WORDS = (
    "the a data token model train loss step batch rank shard layer head norm rotary "
    "attention feed forward café naïve Straße 東京 42 3.14 (x) [y] {z}"
).split()


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(sentence(rng) for _ in range(300)) + "\n")
    return train_tokenizer([corpus], folder / "tokenizer.model", vocab_size=320, num_threads=1)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def read_documents(prefix: Path) -> list[np.ndarray]:
    dataset = megatron_indexed_dataset().IndexedDataset(str(prefix))
    bounds = dataset.document_indices
    docs = []
    for d in range(len(bounds) - 1):
        seqs = [dataset[i] for i in range(bounds[d], bounds[d + 1])]
        docs.append(np.concatenate(seqs).astype(np.int64))
    return docs


def check_documents(prefix: Path, tokenizer: Tokenizer, texts: list[str], *, bos=True) -> None:
    docs = read_documents(prefix)
    assert len(docs) == len(texts)
    for ids, text in zip(docs, texts, strict=True):
        assert ids[-1] == tokenizer.eos_id
        assert (ids[:-1] != tokenizer.eos_id).all()
        assert (ids[0] == tokenizer.bos_id) == bos
        assert tokenizer.decode(ids[1 if bos else 0 : -1]) == text
        assert ids.tolist() == tokenizer.encode(text, bos=bos, eos=True)


def test_txt_one_document_per_file(tmp_path, tokenizer_path, tokenizer):
    rng = random.Random(1)
    texts = [sentence(rng) + "\n" + sentence(rng) + "\n", "  indented start, no final newline"]
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "b.txt").write_text(texts[1])
    (tmp_path / "blank.txt").write_text("\n  \n")  # whitespace only: no document
    inputs = [tmp_path / "a.txt", tmp_path / "blank.txt", tmp_path / "b.txt"]
    meta = prepare_data(inputs, tmp_path / "out" / "ds", tokenizer_path, workers=1, progress=False)

    check_documents(tmp_path / "out" / "ds", tokenizer, texts)
    all_ids = np.concatenate(read_documents(tmp_path / "out" / "ds"))
    sidecar = json.loads((tmp_path / "out" / "ds.meta.json").read_text())
    assert sidecar == meta
    assert meta["vocab_size"] == tokenizer.vocab_size == 320
    assert (meta["eos_id"], meta["bos_id"], meta["bos"]) == (2, 1, True)
    assert meta["num_documents"] == 2
    assert meta["num_tokens"] == len(all_ids)
    assert meta["max_token_id"] == all_ids.max()
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"] == str(Path(tokenizer_path).resolve())
    # Nothing but the three dataset files is left beside the output.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "ds.bin",
        "ds.idx",
        "ds.meta.json",
    ]


def test_txt_paragraph_split_without_bos(tmp_path, tokenizer_path, tokenizer):
    paragraphs = ["First paragraph,\ntwo lines.", "  Second, indented.", "Third 東京 42."]
    (tmp_path / "p.txt").write_text(
        "\n\n" + paragraphs[0] + "\n\n\n" + paragraphs[1] + "\n \t\n" + paragraphs[2] + "\n"
    )
    prepare_data(
        [tmp_path / "p.txt"],
        tmp_path / "ds",
        tokenizer_path,
        workers=1,
        split="paragraph",
        bos=False,
        progress=False,
    )
    check_documents(tmp_path / "ds", tokenizer, paragraphs, bos=False)
    assert json.loads((tmp_path / "ds.meta.json").read_text())["bos"] is False


def test_documents_begin_as_sampling_prompts_do(tmp_path, tokenizer_path, tokenizer):
    """Prepared by default, a document starts with the tokens a sampling prompt of its first
    words starts with (BOS, then the words), so the model is sampled from where it trained."""
    from llama_dist.train.pretrain import sample_prompt_ids

    (tmp_path / "a.txt").write_text("The cat sat on the mat.")
    prepare_data([tmp_path / "a.txt"], tmp_path / "ds", tokenizer_path, workers=1, progress=False)
    [doc] = read_documents(tmp_path / "ds")
    [prompt] = sample_prompt_ids(tokenizer, ["The cat"])
    assert prompt[0] == tokenizer.bos_id == doc[0]
    assert doc[: len(prompt)].tolist() == prompt


def test_jsonl_and_folders(tmp_path, tokenizer_path, tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = [{"body": "one two", "id": 1}, {"body": ""}, {"body": "three\nfour"}]
    lines = [json.dumps(r) for r in records]
    (corpus / "b.jsonl").write_text(lines[0] + "\n\n" + lines[1] + "\n" + lines[2] + "\n")
    (corpus / "a.txt").write_text("from the text file")
    (corpus / "notes.md").write_text("not part of the corpus")
    meta = prepare_data([corpus], tmp_path / "ds", tokenizer_path, text_key="body", workers=1)
    # Folder files in sorted order; the empty record is skipped.
    check_documents(tmp_path / "ds", tokenizer, ["from the text file", "one two", "three\nfour"])
    assert meta["num_documents"] == 3


def test_worker_count_does_not_change_the_output(tmp_path, tokenizer_path):
    rng = random.Random(2)
    # More documents than one chunk per worker, so the pool really interleaves.
    (tmp_path / "p.txt").write_text(
        "\n\n".join(sentence(rng, rng.randint(1, 30)) for _ in range(150))
    )
    with (tmp_path / "d.jsonl").open("w") as f:
        for _ in range(70):
            f.write(json.dumps({"text": sentence(rng, rng.randint(1, 40))}) + "\n")
    inputs = [tmp_path / "p.txt", tmp_path / "d.jsonl"]
    for workers in (1, 2):
        prepare_data(
            inputs, tmp_path / f"w{workers}", tokenizer_path, workers=workers, split="paragraph"
        )
    for suffix in (".bin", ".idx", ".meta.json"):
        one = (tmp_path / f"w1{suffix}").read_bytes()
        assert one == (tmp_path / f"w2{suffix}").read_bytes(), suffix
    assert json.loads((tmp_path / "w1.meta.json").read_text())["num_documents"] == 220


def test_command_line(tmp_path, tokenizer_path, tokenizer):
    (tmp_path / "a.txt").write_text("alpha beta\n\ngamma")
    command = [sys.executable, "launch/prepare_data.py", "--input", str(tmp_path / "a.txt")]
    command += ["--out", str(tmp_path / "ds"), "--tokenizer", str(tokenizer_path)]
    done = subprocess.run(
        [*command, "--workers", "1", "--split", "paragraph", "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "2 documents" in done.stdout
    check_documents(tmp_path / "ds", tokenizer, ["alpha beta", "gamma"])

    bad = subprocess.run(
        [*command[:3], str(tmp_path / "missing.txt"), *command[4:]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "missing.txt" in bad.stderr and "does not exist" in bad.stderr


def test_empty_corpus_writes_nothing(tmp_path, tokenizer_path):
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    inputs = [tmp_path / "blank.txt", tmp_path / "empty.jsonl"]
    with pytest.raises(ValueError, match="no non-empty document"):
        prepare_data(inputs, tmp_path / "out" / "ds", tokenizer_path, workers=1, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, tokenizer_path, workers):
    good = json.dumps({"text": "fine"})
    (tmp_path / "bad.jsonl").write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3 is not valid JSON"):
        prepare_data([tmp_path / "bad.jsonl"], tmp_path / "ds", tokenizer_path, workers=workers)
    (tmp_path / "nokey.jsonl").write_text(f"{good}\n{json.dumps({'content': 'x'})}\n")
    with pytest.raises(ValueError, match=r"nokey\.jsonl, line 2 has no 'text' field.*--text-key"):
        prepare_data([tmp_path / "nokey.jsonl"], tmp_path / "ds", tokenizer_path, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "nokey.jsonl"]


def test_input_errors(tmp_path, tokenizer_path):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "a.csv").write_text("text")
    out = tmp_path / "ds"
    with pytest.raises(ValueError, match="no inputs"):
        prepare_data([], out, tokenizer_path)
    with pytest.raises(ValueError, match="missing.txt' does not exist"):
        prepare_data([tmp_path / "a.txt", tmp_path / "missing.txt"], out, tokenizer_path)
    with pytest.raises(ValueError, match=r"unknown extension '\.csv'.*\.txt or \.jsonl"):
        prepare_data([tmp_path / "a.csv"], out, tokenizer_path)
    with pytest.raises(ValueError, match="tokenizer model .* does not exist"):
        prepare_data([tmp_path / "a.txt"], out, tmp_path / "nope.model")
    with pytest.raises(ValueError, match="split='sentence' must be one of"):
        prepare_data([tmp_path / "a.txt"], out, tokenizer_path, split="sentence")
    with pytest.raises(ValueError, match="names a dataset file"):
        prepare_data([tmp_path / "a.txt"], tmp_path / "ds.bin", tokenizer_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.txt"]
