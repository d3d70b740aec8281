"""The demo's harness tasks: how they are built from plays and Alpaca records, that the
shipped files are well-formed, and that the harness runs them on a llama_dist model."""

from __future__ import annotations

import json

import pytest

from llama_dist.evaluation import bundled_tasks, run_tasks
from llama_dist.evaluation.demo_tasks import alpaca_choice_task, shakespeare_tasks, speeches
from llama_dist.evaluation.local_tasks import TASKS_DIR

DEMO_TASKS = ["demo_shakespeare_next_line", "demo_shakespeare_ppl", "demo_alpaca_choice"]

PLAY = """THE TRAGEDY OF NOTHING

ACT I. Scene I.

[Enter two watchmen.]

Ber.
Who's there upon the wall tonight, good friend?
Nay, answer me: stand, and unfold yourself.
Long live the king, and all his court besides!
[Exeunt.]

Fran.
You come most carefully upon your hour,
For this relief much thanks: 'tis bitter cold,
And I am sick at heart this winter night.
Not a mouse stirring in the castle hall.
"""


def _play(n: int) -> str:
    return "\n".join(
        f"Speaker{chr(65 + i % 26)}.\n"
        + "\n".join(f"Line {j} of speech {n}-{i}, spoken with some care." for j in range(8))
        + "\n"
        for i in range(12)
    )


def test_speeches_are_the_spoken_lines_of_each_speaker_block():
    assert speeches(PLAY) == [
        [
            "Who's there upon the wall tonight, good friend?",
            "Nay, answer me: stand, and unfold yourself.",
            "Long live the king, and all his court besides!",
        ],
        [
            "You come most carefully upon your hour,",
            "For this relief much thanks: 'tis bitter cold,",
            "And I am sick at heart this winter night.",
            "Not a mouse stirring in the castle hall.",
        ],
    ]


def test_next_line_items_hold_the_true_line_among_distractors(tmp_path):
    paths = []
    for n in range(3):
        paths.append(tmp_path / f"play{n}_gut.txt")
        paths[-1].write_text(_play(n))
    items, passages = shakespeare_tasks(paths, num_choice=20, num_passages=5, seed=3)
    assert len(items) == 20 and len(passages) == 5
    every_speech = {tuple(s) for path in paths for s in speeches(path.read_text())}
    for item in items:
        first, second = item["context"].split("\n")
        (speech,) = [s for s in every_speech if s[:2] == (first, second)]
        assert item["choices"][item["label"]] == speech[2]
        assert len(set(item["choices"])) == 4
    assert {item["label"] for item in items} != {items[0]["label"]}  # the answer moves
    assert all(tuple(p["text"].split("\n")) in every_speech for p in passages)
    assert shakespeare_tasks(paths, num_choice=20, num_passages=5, seed=3) == (items, passages)
    (tmp_path / "notes.txt").write_text("no speakers here\n\nnor here\n")
    with pytest.raises(ValueError, match="no speeches found in 1 text"):
        shakespeare_tasks([tmp_path / "notes.txt"])


def test_alpaca_items_pair_each_instruction_with_its_answer():
    records = [
        {"instruction": f"Say {i}.", "input": "loudly" if i % 2 else "", "output": f"{i}!"}
        for i in range(10)
    ]
    records.append({"instruction": "Too long.", "input": "", "output": "x" * 400})
    items = alpaca_choice_task(records, num_items=10, seed=1)
    assert len(items) == 10
    for item in items:
        number = item["question"].split()[1].rstrip(".")
        assert item["choices"][item["label"]] == f"{number}!"
        assert ("\n\nloudly" in item["question"]) == (int(number) % 2 == 1)
        assert "x" * 400 not in item["choices"]
    with pytest.raises(ValueError, match="only 3 Alpaca records"):
        alpaca_choice_task(records[:3] + records[-1:])


def test_shipped_files_are_well_formed():
    assert set(DEMO_TASKS) <= set(bundled_tasks())
    data = TASKS_DIR / "data"
    for name in ("demo_shakespeare_next_line", "demo_alpaca_choice"):
        items = [json.loads(line) for line in (data / f"{name}.jsonl").read_text().splitlines()]
        assert len(items) == 100
        for item in items:
            assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
    passages = (data / "demo_shakespeare_ppl.jsonl").read_text().splitlines()
    assert len(passages) == 20 and all(json.loads(p)["text"] for p in passages)


def test_harness_runs_the_demo_tasks(ours):
    results = run_tasks(ours, DEMO_TASKS, limit=4)["results"]
    assert 0 <= results["demo_shakespeare_next_line"]["acc,none"] <= 1
    assert 0 <= results["demo_alpaca_choice"]["acc,none"] <= 1
    assert results["demo_shakespeare_ppl"]["word_perplexity,none"] > 1
    assert results["demo_shakespeare_ppl"]["bits_per_byte,none"] > 0
