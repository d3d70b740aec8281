"""Time per PPO iteration and its split: generation, scoring, training.

Runs the real loop, `llama_dist.train.ppo.ppo`, with its config composed from conf/ppo.yaml as
launch/ppo.py composes it, on inputs built in a temporary folder: a tokenizer trained on a
synthetic corpus (or `--tokenizer`), a policy of `--preset` (default `tiny`) with that
tokenizer's vocabulary, a reward model of the same backbone (random weights), which starts the
value model and is the scorer (`scorer.kind=reward_model`), and a prompt file. The weights are
random, so the rewards mean nothing; what is measured is the time.

Each iteration's train record in `<run_dir>/metrics.jsonl` holds rank 0's `generate_s`
(consolidating the policy and sampling one response per prompt), `score_s` (decoding the
responses and the reward model's forwards), `train_s` (the rollout rows, the no-grad forwards
of policy, reference and value model, `forward_s`, then whitening, GAE and per minibatch one
optimizer step of policy and value). The measured total of an iteration is the time between
its record and the previous one (the records' `time`, written by rank 0), so the first
iteration after the `--warmup` ones is the first timed; "other" is what the three keys leave
out of it (the record's all-reduces, logging, the stop check). Generated tokens/s = the
responses' tokens over all ranks (eos included) / generate_s.

Without torchrun the script spawns `--world-size` processes itself (gloo on CPU, one thread
each unless `--threads`); under torchrun it runs in the launched group (nccl on GPUs):
`torchrun --nproc-per-node 8 benchmarks/ppo.py --preset small --batch-prompts 64 ...`
(`--work-dir` names a folder every node sees when there is more than one node).

Command lines of benchmarks/results/ppo_cpu.md and ppo_cpu_tp.md (about 2 minutes each on 2
shared cores; the defaults are the tiny preset, 16 prompts, minibatches of 8, 32 new tokens):
`python benchmarks/ppo.py --out benchmarks/results/ppo_cpu.md`
`python benchmarks/ppo.py --layout tp --out benchmarks/results/ppo_cpu_tp.md`
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llama_dist.checkpoint import save_model_checkpoint
from llama_dist.metrics.logger import read_metrics
from llama_dist.models.config import PRESETS, get_preset
from llama_dist.models.llama import Llama
from llama_dist.models.reward import reward_config
from llama_dist.parallel import init_distributed
from llama_dist.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("fsdp", "tp")
# The record keys of the split, in the table's order.
PARTS = ("generate_s", "score_s", "train_s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ppo.py", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--n-layers", type=int, default=None, help="override the preset's depth")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a tokenizer.model to use (default: train one with the preset's vocabulary size)",
    )
    parser.add_argument("--batch-prompts", type=int, default=16, help="ppo.batch_prompts")
    parser.add_argument("--minibatch-prompts", type=int, default=8, help="ppo.minibatch_prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="ppo.max_new_tokens")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/rank")
    parser.add_argument("--layout", choices=LAYOUTS, default="fsdp", help="tp: conf/parallel/tp")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree with tp")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--num-prompts", type=int, default=64, help="prompts in the file")
    parser.add_argument("--prompt-words", type=int, default=24, help="longest prompt, in words")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another Hydra override of conf/ppo.yaml (repeatable)",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--world-size", type=int, default=2, help="without torchrun")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank (default: 1)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE", help="the markdown")
    parser.add_argument(
        "--out-json", type=Path, default=None, metavar="FILE", help="the records and rows"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.n_layers = "debug", None
        args.batch_prompts, args.minibatch_prompts, args.micro_batch = 4, 2, 2
        args.max_new_tokens, args.iterations, args.warmup = 4, 2, 1
        args.num_prompts, args.prompt_words = 8, 8
    if args.iterations < 1 or args.warmup < 1:
        # The first timed iteration is measured from the record of the one before it.
        parser.error("--iterations and --warmup must be >= 1")
    return args


# Inputs ---------------------------------------------------------------------------------------
def synthetic_words(n: int, seed: int = 0) -> list[str]:
    """Pronounceable made-up words, enough distinct ones for an 8000-piece BPE."""
    rng = random.Random(seed)
    onsets = "b c d f g h j k l m n p r s t v w z ch sh th st tr br".split()
    vowels = "a e i o u ai ea ou".split()
    syllables = [c + v for c in onsets for v in vowels] + [
        c + v + "n" for c in onsets[:10] for v in vowels
    ]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def build_inputs(args: argparse.Namespace, root: Path) -> dict[str, str]:
    """Tokenizer, policy and reward-model checkpoints and the prompt file under `root`."""
    rng = random.Random(0)
    words = synthetic_words(6000)
    if args.tokenizer is not None:
        tokenizer, source = args.tokenizer, str(args.tokenizer)
    else:
        vocab_size = get_preset(args.preset).vocab_size
        lines = [
            " ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(20000)
        ]
        corpus = root / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n")
        tokenizer = train_tokenizer(
            [corpus], root / "tokenizer.model", vocab_size=vocab_size, num_threads=1
        )
        source = f"trained here, {vocab_size} pieces on {len(lines)} synthetic lines"
    shape = {"vocab_size": Tokenizer(tokenizer).vocab_size}
    if args.n_layers is not None:
        shape["n_layers"] = args.n_layers
    cfg = get_preset(args.preset, **shape)
    policy = Llama(cfg)
    policy.init_weights(0)
    policy_path = save_model_checkpoint(root / "policy", policy.state_dict(), cfg)
    del policy
    rm = Llama(reward_config(cfg))
    rm.init_weights(1)
    rm_path = save_model_checkpoint(root / "rm", rm.state_dict(), rm.cfg)
    del rm
    shortest = max(1, args.prompt_words // 3)
    prompts = [
        {
            "prompt": " ".join(
                rng.choice(words) for _ in range(rng.randint(shortest, args.prompt_words))
            )
        }
        for _ in range(args.num_prompts)
    ]
    prompt_path = root / "prompts.jsonl"
    prompt_path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return {
        "tokenizer": str(tokenizer),
        "tokenizer_source": source,
        "policy": str(policy_path),
        "rm": str(rm_path),
        "prompts": str(prompt_path),
        "num_params": cfg.num_params(),
        "cfg": cfg.to_dict(),
    }


def overrides(args: argparse.Namespace, files: dict[str, str]) -> list[str]:
    """The Hydra overrides of conf/ppo.yaml for this run."""
    out = [
        f"policy={files['policy']}",
        f"tokenizer={files['tokenizer']}",
        f"prompts=[{files['prompts']}]",
        "scorer.kind=reward_model",
        f"scorer.reward_model={files['rm']}",  # and so the value model's start (value_from)
        f"device={args.device}",
        "wandb=false",
        "eval_every=0",
        f"iterations={args.warmup + args.iterations}",
        f"ppo.batch_prompts={args.batch_prompts}",
        f"ppo.minibatch_prompts={args.minibatch_prompts}",
        f"ppo.max_new_tokens={args.max_new_tokens}",
        f"micro_batch={args.micro_batch}",
        f"scorer.micro_batch={args.micro_batch}",
        # Only the final checkpoint, written after the last record.
        "checkpoint.every=1000000",
    ]
    if args.layout == "tp":
        out += ["parallel=tp", f"parallel.tp={args.tp}"]
    return [*out, *args.override]


def compose_job(args: argparse.Namespace, files: dict[str, str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from llama_dist.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("ppo", overrides=overrides(args, files)))


# Every rank -----------------------------------------------------------------------------------
def rank_main(args: argparse.Namespace) -> dict | None:
    """Every rank: run PPO on inputs rank 0 builds; rank 0 returns its records and meta."""
    from llama_dist.train.ppo import ppo

    device = init_distributed(device=args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rank = dist.get_rank()
    shared: list = [None]
    if rank == 0:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="ppo-bench-", dir=args.work_dir))
        shared[0] = {"root": str(root), **build_inputs(args, root)}
    dist.broadcast_object_list(shared, src=0)
    files = shared[0]
    run_dir = Path(files["root"]) / "run"
    try:
        ppo(compose_job(args, files), run_dir)
        out = None
        if rank == 0:
            out = {
                "records": [r for r in read_metrics(run_dir) if r["kind"] == "train"],
                "meta": {
                    "device": device_name(device),
                    "world_size": dist.get_world_size(),
                    "overrides": overrides(args, files),
                    **{k: files[k] for k in ("tokenizer_source", "num_params", "cfg")},
                },
            }
        dist.barrier()
    finally:
        if rank == 0:
            shutil.rmtree(files["root"], ignore_errors=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, out_file: str, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    try:
        result = rank_main(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result is not None:
        Path(out_file).write_text(json.dumps(result))


def spawn(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "result.json")
        mp.start_processes(
            _spawned,
            args=(args.world_size, _free_port(), out_file, args),
            nprocs=args.world_size,
            join=True,
            start_method="spawn",
        )
        return json.loads(Path(out_file).read_text())


# Output ---------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (nccl)"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {name}, {threads} thread{'s' if threads > 1 else ''} per rank (gloo)"


def iteration_rows(records: list[dict], *, warmup: int, batch_prompts: int) -> list[dict]:
    """One row per timed iteration and a last one, "mean"; seconds, shares of the measured
    total, generated tokens/s, mean response length."""
    by_step = {r["step"]: r for r in records}
    rows = []
    for step in sorted(by_step):
        if step <= warmup:
            continue
        r = by_step[step]
        row = {k: r[k] for k in (*PARTS, "forward_s")}
        row["update_s"] = r["train_s"] - r["forward_s"]
        row["total_s"] = r["time"] - by_step[step - 1]["time"]
        row["tokens"] = r["response_length"] * batch_prompts
        row["response_length"] = r["response_length"]
        rows.append({"iteration": str(step), **row})
    mean = {"iteration": "mean"}
    for key in rows[0]:
        if key != "iteration":
            mean[key] = sum(row[key] for row in rows) / len(rows)
    rows.append(mean)
    for row in rows:
        row["other_s"] = row["total_s"] - sum(row[k] for k in PARTS)
        for key in (*PARTS, "other_s"):
            row[key.replace("_s", "_share")] = row[key] / row["total_s"]
        row["tokens_per_s"] = row["tokens"] / row["generate_s"]
    return rows


def results_table(rows: list[dict]) -> str:
    lines = [
        "| iteration | generate s | score s | train s | (no-grad fwd s) | (updates s) | other s "
        "| total s | generate | score | train | other | generated tokens/s | response length |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = "**mean**" if r["iteration"] == "mean" else r["iteration"]
        lines.append(
            f"| {name} | {r['generate_s']:.2f} | {r['score_s']:.2f} | {r['train_s']:.2f} "
            f"| {r['forward_s']:.2f} | {r['update_s']:.2f} | {r['other_s']:.2f} "
            f"| {r['total_s']:.2f} | {100 * r['generate_share']:.1f}% "
            f"| {100 * r['score_share']:.1f}% | {100 * r['train_share']:.1f}% "
            f"| {100 * r['other_share']:.1f}% | {r['tokens_per_s']:.1f} "
            f"| {r['response_length']:.1f} |"
        )
    return "\n".join(lines)


def render_markdown(rows: list[dict], meta: dict, args: argparse.Namespace, argv) -> str:
    cfg = meta["cfg"]
    layout = "FSDP" if args.layout == "fsdp" else f"FSDP x TP {args.tp} with sequence parallel"
    depth = "" if args.n_layers is None else f" ({cfg['n_layers']} layers)"
    lines = [
        "# PPO: time per iteration and its split",
        "",
        f"- device: {meta['device']}, {meta['world_size']} ranks",
        f"- torch: {torch.__version__}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `python benchmarks/ppo.py {shlex.join(argv)}`",
        f"- policy: preset {args.preset}{depth}, dim {cfg['dim']}, {cfg['n_layers']} layers, "
        f"{cfg['n_heads']} heads, {cfg['n_kv_heads']} kv heads, vocab {cfg['vocab_size']}: "
        f"{meta['num_params']:,} parameters, random weights; tokenizer {meta['tokenizer_source']}",
        "- models on every rank: policy (trained), reference (frozen), value model (trained, "
        "from the reward model), scorer (the same reward model, frozen)",
        f"- layout: {layout}; {args.batch_prompts} prompts per iteration, minibatches of "
        f"{args.minibatch_prompts} (one optimizer step of policy and value each), micro-batch "
        f"{args.micro_batch} per rank, up to {args.max_new_tokens} new tokens sampled at "
        "temperature 1",
        f"- {args.iterations} timed iteration(s) after {args.warmup} untimed",
        f"- load average when the report was written: {os.getloadavg()[0]:.2f} (other work on "
        "the machine slows every part)",
        "",
        results_table(rows),
        "",
        "What the columns are (rank 0's clock; `train/ppo.py`'s record keys):",
        "",
        "- generate: `generate_s`, consolidating the sharded policy (one all-gather of its "
        "weights) and sampling one response per prompt, each rank its share",
        "- score: `score_s`, decoding the responses and the reward model's forwards (FSDP-sharded)",
        "- train: `train_s` = (no-grad fwd) `forward_s`, building the rollout rows and the "
        "forwards of policy (old log-probs), reference and value model, + (updates) the "
        "whitening, GAE and, per minibatch, the policy's and the value model's forward, "
        "backward and optimizer step",
        "- other: total minus the three: the record's all-reduces (means over ranks), writing "
        "the record, the stop check",
        "- total: time between this iteration's record and the previous one",
        "- generated tokens/s: response tokens of all ranks (eos included) / generate s",
        "- response length: mean tokens per response, over all ranks",
        "",
        "Not timed apart by the record: the consolidation inside generate, the policy's update "
        "against the value model's inside (updates), the reference's forward against the "
        "others' inside (no-grad fwd). `forward_s` was added to the record for this benchmark.",
        "",
        "## Config",
        "",
        "Hydra overrides of conf/ppo.yaml (the temporary folder's paths shortened):",
        "",
        "```",
        *(_short(o) for o in meta["overrides"]),
        "```",
        "",
    ]
    return "\n".join(lines)


def _short(override: str) -> str:
    return re.sub(r"/[^\s,\]]*ppo-bench-[^/]+", "$TMP", override)


def main(argv: Sequence[str] | None = None) -> tuple[list[dict], str] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.tokenizer is not None:
        Tokenizer(args.tokenizer)  # a damaged file is named here, not inside the workers
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        raw = rank_main(args)
        dist.destroy_process_group()
        if raw is None:  # not rank 0
            return None
    else:
        raw = spawn(args)
    rows = iteration_rows(raw["records"], warmup=args.warmup, batch_prompts=args.batch_prompts)
    markdown = render_markdown(rows, raw["meta"], args, argv)
    print(markdown)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown)
    if args.out_json is not None:
        args.out_json.write_text(json.dumps({**raw, "rows": rows}, indent=2))
    return rows, markdown


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad arguments or input files: one line, no traceback
        print(f"ppo.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
