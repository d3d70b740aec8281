"""Prepare the data of the recipe demo (conf/recipe.yaml): a synthetic chat task whose rules are
known, so every stage's effect can be checked on CPU in minutes.

    python launch/prepare_recipe_demo.py [--out data/recipe_demo]

Writes, all from seeded generators (no download):
- `corpus.jsonl` -> `corpus.bin/.idx/.meta.json`: the pretraining corpus, documents in the
  task's words (answers, prompts, instructions, pre-prompts), and `tokenizer.model` trained on
  it (Llama 2's settings, a small vocabulary);
- `sft.jsonl`: prompts answered helpfully and safely (the synthetic rule: helpful answers hold
  many of `GOOD_WORDS`, safe ones none of `BAD_WORDS`);
- `helpful.jsonl`, `open_source.jsonl`, `safety.jsonl`: preference pairs that follow the
  helpfulness rule (two seeds) and the safety rule (llama2.md, "Reward models" mixes);
- `prompts.jsonl`: prompts for rejection sampling and PPO;
- `safety_prompts.jsonl`: adversarial prompts in the paper's three risk categories and helpful
  ones, for safety context distillation and the evaluation.
Files already there are kept.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from llama_dist.data.gatt import synthetic_words
from llama_dist.data.preference import (
    BAD_WORDS,
    GOOD_WORDS,
    NEUTRAL_WORDS,
    write_synthetic_preferences,
)
from llama_dist.data.prepare import prepare_data
from llama_dist.data.records import read_records
from llama_dist.data.safety_prompts import TOPICS, write_synthetic_safety_prompts
from llama_dist.rlhf.context_distillation import ANSWER_TEMPLATES, SAFETY_ADJECTIVES
from llama_dist.tokenizer import train_tokenizer

VOCAB_SIZE = 512


def _answer(rng: random.Random, *, good: int) -> str:
    words = [rng.choice(GOOD_WORDS) for _ in range(good)]
    words += [rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(3, 6))]
    rng.shuffle(words)
    return " ".join(words)


def corpus_documents(rng: random.Random, n: int) -> list[str]:
    """Documents in the task's words: answers (safe and not), prompts, the GAtt task's words,
    pre-prompts and answer templates."""
    vocabulary = [*GOOD_WORDS, *BAD_WORDS, *NEUTRAL_WORDS, *TOPICS, *synthetic_words()]
    preprompts = [
        f"You are a {a} and {b} assistant." for a in SAFETY_ADJECTIVES for b in SAFETY_ADJECTIVES
    ]
    docs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            docs.append(
                f"Tell me about {rng.choice(TOPICS)}. {_answer(rng, good=rng.randint(0, 4))}"
            )
        elif kind == 1:
            docs.append(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(8, 30))))
        elif kind == 2:
            docs.append(f"{rng.choice(preprompts)} {rng.choice(list(ANSWER_TEMPLATES.values()))}")
        else:
            words = " ".join(rng.choice(synthetic_words()) for _ in range(rng.randint(2, 6)))
            docs.append(f"repeat: {words} {words}")
    return docs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def prepare(out: Path, *, documents: int = 4000, pairs: int = 400, seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = {}
    corpus = out / "corpus.jsonl"
    if not corpus.is_file():
        write_jsonl(corpus, [{"text": t} for t in corpus_documents(rng, documents)])
    files["tokenizer"] = out / "tokenizer.model"
    if not files["tokenizer"].is_file():
        text = out / "tokenizer_corpus.txt"
        text.write_text("\n".join(r["text"] for _, r in read_records(corpus)) + "\n")
        train_tokenizer([text], files["tokenizer"], vocab_size=VOCAB_SIZE, num_threads=1)
        text.unlink()
    files["corpus"] = out / "corpus"
    if not Path(str(files["corpus"]) + ".meta.json").is_file():
        prepare_data([corpus], files["corpus"], files["tokenizer"], workers=1, progress=False)
    files["sft"] = out / "sft.jsonl"
    if not files["sft"].is_file():
        write_jsonl(
            files["sft"],
            [
                {
                    "messages": [
                        {"role": "user", "content": f"Tell me about {rng.choice(TOPICS)}."},
                        {"role": "assistant", "content": _answer(rng, good=rng.randint(2, 4))},
                    ]
                }
                for _ in range(pairs)
            ],
        )
    for name, rule, s in (
        ("helpful", "helpfulness", 1),
        ("open_source", "helpfulness", 2),
        ("safety", "safety", 3),
    ):
        files[name] = out / f"{name}.jsonl"
        if not files[name].is_file():
            write_synthetic_preferences(files[name], num_pairs=pairs, seed=seed + s, rule=rule)
    files["prompts"] = out / "prompts.jsonl"
    if not files["prompts"].is_file():
        prompts = [{"prompt": f"Tell me about {t}."} for t in TOPICS]
        prompts += [{"prompt": f"Tell me about {t} and {u}."} for t in TOPICS for u in TOPICS]
        write_jsonl(files["prompts"], prompts[:32])
    files["safety_prompts"] = out / "safety_prompts.jsonl"
    if not files["safety_prompts"].is_file():
        write_synthetic_safety_prompts(
            files["safety_prompts"], num_adversarial=18, num_helpful=6, seed=seed
        )
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/recipe_demo"))
    parser.add_argument("--documents", type=int, default=4000, help="pretraining documents")
    parser.add_argument("--pairs", type=int, default=400, help="SFT records and pairs per file")
    args = parser.parse_args(argv)
    try:
        files = prepare(args.out, documents=args.documents, pairs=args.pairs)
    except ValueError as e:
        print(f"prepare_recipe_demo.py: error: {e}", flush=True)
        return 2
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
