"""What the lm-eval tests share: a tiny model saved both ways, the same tokenizer on both
sides, and the requests they score. The fixtures over these are in conftest.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from lm_eval.api.instance import Instance
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from llama_dist.checkpoint import save_model_checkpoint
from llama_dist.evaluation import bundled_tasks
from llama_dist.models import Llama, LlamaConfig
from llama_dist.models.hf_adapter import save_hf_folder
from llama_dist.tokenizer import train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4
MAX_SEQ_LEN = 64
WORDS = "the cat sat on a mat and dog ran to big red sun in sky we see it now".split()


class SentencePieceHFTokenizer(SentencePieceBackend):
    """transformers' tokenizer over the SentencePiece file, bos added, decoding through
    sentencepiece itself (the generic decode joins pieces and strips spaces differently)."""

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        # sentencepiece drops control pieces; HF writes them out unless skipped (HFLM's eos
        # stop string is the decoded eos, which must not be empty).
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        special = set(self.all_special_ids)
        text, run = "", []
        for i in ids:
            if i in special:
                text += self.sp_model.decode(run) + (
                    "" if skip_special_tokens else self.sp_model.id_to_piece(i)
                )
                run = []
            else:
                run.append(i)
        return text + self.sp_model.decode(run)


def make_files(root: Path) -> dict[str, Path]:
    """A tokenizer, a tiny model as a llama_dist checkpoint and as an HF folder, in `root`."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(300)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    tokenizer = train_tokenizer(
        [root / "corpus.txt"], root / "tokenizer.model", vocab_size=300, num_threads=1
    )
    cfg = LlamaConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=300,
        multiple_of=16,
        max_seq_len=MAX_SEQ_LEN,
    ).validate()
    model = Llama(cfg)
    model.init_weights(3)
    with torch.no_grad():
        # At the init scale every token is nearly equally likely; larger weights give the
        # model preferences, so accuracy and greedy tokens depend on the logits.
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.mul_(4.0)
    save_model_checkpoint(root / "ckpt", model.state_dict(), cfg)
    save_hf_folder(model.state_dict(), cfg, root / "hf")
    return {"root": root, "tokenizer": tokenizer, "ckpt": root / "ckpt", "hf": root / "hf"}


def task_texts() -> list[str]:
    """Every context and context + continuation of the bundled tasks' data."""
    data = bundled_tasks()["llama_dist_mc"].parent / "data"
    texts = []
    for name in ("llama_dist_mc.jsonl", "llama_dist_gen.jsonl"):
        for line in (data / name).read_text().splitlines():
            doc = json.loads(line)
            if "choices" in doc:
                texts += [doc["question"]] + [f"{doc['question']} {c}" for c in doc["choices"]]
            else:
                texts += [doc["prompt"], doc["prompt"] + doc["answer"]]
    return texts


LL_REQUESTS = [
    ("the cat sat on a", " mat"),
    ("the cat sat on a", " mat and a dog ran to the sun"),
    ("", "the dog"),  # empty context: the prefix token (bos) stands in
    ("we see it ", "now"),  # trailing space moves into the continuation
    (" ".join(["the big red sun in the sky"] * 12), " and we see it"),  # longer than the window
]
ROLLING = ["the cat sat on a mat", " ".join(["we see the big red sun in the sky now"] * 10)]


def instances(kind: str, args_list) -> list[Instance]:
    return [
        Instance(request_type=kind, doc={}, arguments=args, idx=i)
        for i, args in enumerate(args_list)
    ]


def per_sample(results, task: str) -> list:
    return [
        (
            s["doc_id"],
            [
                list(map(float, r)) if isinstance(r, (list, tuple)) else r
                for r in s["filtered_resps"]
            ],
        )
        for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])
    ]


def harness_cli(files: dict[str, Path], tasks: list[str], out: Path, model_args: str = "") -> list:
    """The arguments after the interpreter (or torchrun) for `-m llama_dist.evaluation`: the
    harness's command line on the test checkpoint, on CPU, writing under `out`."""
    return [
        "-m",
        "llama_dist.evaluation",
        "--model",
        "llama_dist",
        "--model_args",
        f"checkpoint={files['ckpt']},tokenizer={files['tokenizer']}{model_args}",
        "--tasks",
        ",".join(tasks),
        "--device",
        "cpu",
        "--output_path",
        str(out),
    ]
