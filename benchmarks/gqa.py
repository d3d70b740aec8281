"""Inference throughput against latency of multi-head, grouped-query and multi-query attention.

The comparison of ../shared/docs/llama2.md ("GQA ablation", Table 18 and the throughput vs
latency figure): three variants of one shape that differ only in their number of key/value
heads, MHA (kv = heads), GQA (kv = heads / 8 by default) and MQA (kv = 1). The FFN of GQA and
MQA is widened to the width that gives them MHA's parameter count (the paper's x1.3 and x1.33
at 30B), so any difference comes from the attention layout and not from a smaller model.

For each batch size each variant encodes a random prompt into its KV cache (prefill), then
decodes `--new-tokens` greedy steps. Throughput is the decoded tokens over the decode time,
latency the time of one decode step. A batch is run only when the model's weights plus its KV
cache fit `--memory-budget-gib`; the others are reported as OOM, as in the paper, where MHA
runs out of memory at batch sizes that MQA and GQA still serve. The budget is a model of an
accelerator's memory: activations and allocator overhead are not counted.

Command line of benchmarks/results/gqa_cpu.md (the default shape; about 2.5 minutes on a
shared 2-core CPU, where one thread is steadier than two):
`python benchmarks/gqa.py --threads 1 --repeats 5 --out-md benchmarks/results/gqa_cpu.md
--out-png benchmarks/results/gqa_cpu.png`
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from llama_dist.models.config import LlamaConfig
from llama_dist.models.llama import KVCache, Llama

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MIB = 2**20
_GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Variant:
    """One attention layout of the base shape, with its FFN widened to MHA's parameters."""

    name: str  # "MHA" | "GQA" | "MQA"
    cfg: LlamaConfig
    ffn_multiplier: float  # FFN hidden width over MHA's
    num_params: int
    param_diff: float  # (num_params - MHA's) / MHA's

    @property
    def label(self) -> str:
        return f"{self.name} (kv={self.cfg.num_kv_heads})"


@dataclasses.dataclass(frozen=True)
class Row:
    """One variant at one batch size; the timings are None when it does not fit the budget."""

    variant: str
    batch_size: int
    kv_cache_bytes: int  # key and value tensors of the cache, counted from the cache itself
    memory_bytes: int  # weights + KV cache, the amount held against the budget
    fits: bool
    new_tokens: int
    prefill_s: float | None = None
    decode_s: float | None = None

    @property
    def tokens_per_s(self) -> float | None:
        if self.decode_s is None:
            return None
        return self.batch_size * self.new_tokens / self.decode_s

    @property
    def ms_per_token(self) -> float | None:
        if self.decode_s is None:
            return None
        return 1e3 * self.decode_s / self.new_tokens


@dataclasses.dataclass
class Report:
    variants: list[Variant]
    rows: list[Row]
    budget_bytes: int
    weight_bytes: dict[str, int]  # by variant name
    largest_batch: dict[str, int | None]  # the largest listed batch size in the budget
    markdown: str


# Shapes ---------------------------------------------------------------------------------------
def equal_param_ffn_dim(base: LlamaConfig, n_kv_heads: int) -> int:
    """FFN hidden width with which `base` at `n_kv_heads` key/value heads has the parameter
    count of `base`, as close as an integer width allows.

    Fewer kv heads shrink wk and wv by 2 * dim * head_dim per head and layer; each unit of FFN
    width adds 3 * dim (w1, w2, w3), so the width grows by 2 * head_dim * (heads - kv) / 3.
    """
    target = base.num_params()
    exact = base.hidden_dim + 2 * base.head_dim * (base.num_kv_heads - n_kv_heads) / 3
    candidates = {int(exact), int(exact) + 1}
    return min(
        candidates,
        key=lambda h: abs(
            base.replace(n_kv_heads=n_kv_heads, ffn_hidden_dim=h).num_params() - target
        ),
    )


def make_variants(base: LlamaConfig, gqa_kv_heads: int) -> list[Variant]:
    """MHA, GQA and MQA of `base` (whose own n_kv_heads is ignored), equal in parameters."""
    mha = base.replace(n_kv_heads=base.n_heads, ffn_hidden_dim=base.hidden_dim)
    mha_params = mha.num_params()
    variants = []
    for name, kv in (("MHA", base.n_heads), ("GQA", gqa_kv_heads), ("MQA", 1)):
        cfg = mha.replace(n_kv_heads=kv, ffn_hidden_dim=equal_param_ffn_dim(mha, kv))
        params = cfg.num_params()
        variants.append(
            Variant(
                name=name,
                cfg=cfg,
                ffn_multiplier=cfg.hidden_dim / mha.hidden_dim,
                num_params=params,
                param_diff=(params - mha_params) / mha_params,
            )
        )
    return variants


# Memory ---------------------------------------------------------------------------------------
def kv_cache_bytes(cache: KVCache) -> int:
    """Bytes of the key and value tensors (not the document ids, which no variant changes)."""
    tensors = [*cache.k.values(), *cache.v.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def kv_cache_bytes_formula(cfg: LlamaConfig, batch_size: int, max_len: int, itemsize: int) -> int:
    return 2 * cfg.n_layers * batch_size * max_len * cfg.num_kv_heads * cfg.head_dim * itemsize


def weight_bytes(model: Llama) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# Running --------------------------------------------------------------------------------------
def build_model(cfg: LlamaConfig, *, device: torch.device, dtype: torch.dtype) -> Llama:
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device=device)
    model.init_weights(seed=0)
    model.to(dtype=dtype)
    # After the cast: the rotary tables stay in fp32.
    model.reset_rope()
    return model.eval()


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously; without this the timer stops before they finish.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_generation(
    model: Llama, batch_size: int, prompt_len: int, new_tokens: int, *, seed: int = 0
) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds, KV cache bytes) of greedy batched generation: one
    forward over the prompt, then `new_tokens` single-token steps through the KV cache."""
    device = model.tok_embeddings.weight.device
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(model.cfg.vocab_size, (batch_size, prompt_len), generator=gen)
    prompt = prompt.to(device)
    cache = model.new_kv_cache(batch_size, prompt_len + new_tokens)
    _sync(device)
    start = time.perf_counter()
    logits = model(prompt, kv_cache=cache)
    tokens = logits[:, -1].argmax(dim=-1, keepdim=True)  # (bsz, 1)
    _sync(device)
    prefilled = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(tokens, kv_cache=cache)
        tokens = logits[:, -1].argmax(dim=-1, keepdim=True)
    _sync(device)
    end = time.perf_counter()
    assert cache.length == prompt_len + new_tokens
    return prefilled - start, end - prefilled, kv_cache_bytes(cache)


def run_benchmark(
    variants: Sequence[Variant],
    *,
    batch_sizes: Sequence[int],
    prompt_len: int,
    new_tokens: int,
    budget_bytes: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[list[Row], dict[str, int]]:
    """Rows of every variant at every batch size (variant-major), and each variant's weight
    bytes. All the models are held at once so that every variant is timed at each batch size
    in turn: a slowdown from other work on the machine then hits all of them alike."""
    models = {v.name: build_model(v.cfg, device=device, dtype=dtype) for v in variants}
    weights = {name: weight_bytes(model) for name, model in models.items()}
    max_len = prompt_len + new_tokens
    for v in variants:
        assert weights[v.name] == v.num_params * models[v.name].output.weight.element_size()
        # Keeps one-time costs (allocator growth, kernel selection) out of the first timing.
        time_generation(models[v.name], min(batch_sizes), prompt_len, min(new_tokens, 2))

    rows: dict[tuple[str, int], Row] = {}
    for batch_size in batch_sizes:
        for v in variants:
            model = models[v.name]
            # A cache on the meta device has the real tensors' sizes and allocates nothing, so
            # a batch over the budget is never materialised.
            kv_bytes = kv_cache_bytes(model.new_kv_cache(batch_size, max_len, device="meta"))
            itemsize = model.output.weight.element_size()
            assert kv_bytes == kv_cache_bytes_formula(v.cfg, batch_size, max_len, itemsize)
            memory = weights[v.name] + kv_bytes
            rows[v.name, batch_size] = Row(
                v.name, batch_size, kv_bytes, memory, memory <= budget_bytes, new_tokens
            )

    # Each round times every point once, so the repeats of one point are spread over the whole
    # run; the fastest of them is the one least disturbed by other work on the machine.
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for round_ in range(repeats):
        for batch_size in batch_sizes:
            for v in variants:
                key = (v.name, batch_size)
                if not rows[key].fits:
                    continue
                prefill, decode, measured = time_generation(
                    models[v.name], batch_size, prompt_len, new_tokens
                )
                assert measured == rows[key].kv_cache_bytes
                old_prefill, old_decode = best.get(key, (float("inf"), float("inf")))
                best[key] = (min(old_prefill, prefill), min(old_decode, decode))
        print(f"round {round_ + 1}/{repeats} done", file=sys.stderr, flush=True)
    for key, (prefill, decode) in best.items():
        rows[key] = dataclasses.replace(rows[key], prefill_s=prefill, decode_s=decode)
    return [rows[v.name, b] for v in variants for b in batch_sizes], weights


# Output ---------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {name}, {threads} thread{'s' if threads > 1 else ''}"


def _fmt(value: float | None, spec: str, missing: str = "OOM") -> str:
    return missing if value is None else format(value, spec)


def results_table(variants: Sequence[Variant], rows: Sequence[Row]) -> str:
    labels = {v.name: v.label for v in variants}
    lines = [
        "| variant | batch | tokens/s | latency ms/token | prefill ms | KV cache MiB "
        "| weights + KV MiB | fits budget |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        prefill_ms = None if row.prefill_s is None else 1e3 * row.prefill_s
        lines.append(
            f"| {labels[row.variant]} | {row.batch_size} | {_fmt(row.tokens_per_s, '.1f')} "
            f"| {_fmt(row.ms_per_token, '.2f')} | {_fmt(prefill_ms, '.1f')} "
            f"| {row.kv_cache_bytes / _MIB:.2f} | {row.memory_bytes / _MIB:.1f} "
            f"| {'yes' if row.fits else 'no (OOM, not run)'} |"
        )
    return "\n".join(lines)


def variants_table(
    variants: Sequence[Variant], report_weights: dict[str, int], budget: int, max_len: int
) -> str:
    lines = [
        "| variant | n_kv_heads | ffn_hidden_dim | FFN width vs MHA | parameters | vs MHA "
        "| weights MiB | KV cache MiB per sequence | max batch in budget |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        weights = report_weights[v.name]
        itemsize = weights // v.num_params
        per_seq = kv_cache_bytes_formula(v.cfg, 1, max_len, itemsize)
        largest = max((budget - weights) // per_seq, 0)
        lines.append(
            f"| {v.label} | {v.cfg.num_kv_heads} | {v.cfg.hidden_dim} | x{v.ffn_multiplier:.4f} "
            f"| {v.num_params:,} | {v.param_diff:+.4%} | {weights / _MIB:.1f} "
            f"| {per_seq / _MIB:.3f} | {largest} |"
        )
    return "\n".join(lines)


def summary(report: Report) -> str:
    """What the rows show, in sentences made from the numbers."""
    lines = []
    mha_oom = [r.batch_size for r in report.rows if r.variant == "MHA" and not r.fits]
    for v in report.variants:
        largest = report.largest_batch[v.name]
        fastest = max(
            (r for r in report.rows if r.variant == v.name and r.fits),
            key=lambda r: r.tokens_per_s or 0.0,
            default=None,
        )
        text = f"- {v.label}: largest listed batch in the budget: {largest or 'none'}"
        if fastest is not None:
            text += (
                f"; peak {fastest.tokens_per_s:.1f} tokens/s at batch {fastest.batch_size} "
                f"({fastest.ms_per_token:.2f} ms/token)"
            )
        lines.append(text + ".")
    if mha_oom:
        others = [
            v.label
            for v in report.variants
            if v.name != "MHA"
            and any(r.fits for r in report.rows if r.variant == v.name and r.batch_size in mha_oom)
        ]
        if others:
            lines.append(
                f"- MHA exceeds the budget from batch {min(mha_oom)}, where "
                f"{' and '.join(others)} still fit."
            )
    return "\n".join(lines)


def render_markdown(
    report: Report, args: argparse.Namespace, argv: Sequence[str], device: torch.device
) -> str:
    max_len = args.prompt_len + args.new_tokens
    configs = {v.name: v.cfg.to_dict() for v in report.variants}
    return "\n".join(
        [
            "# MHA vs GQA vs MQA: inference throughput against latency",
            "",
            f"- device: {device_name(device)}",
            f"- torch: {torch.__version__}",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- command: `python benchmarks/gqa.py {shlex.join(argv)}`",
            f"- dtype: {args.dtype}; prompt {args.prompt_len} tokens, then {args.new_tokens} "
            f"greedy decode steps (KV cache of {max_len} slots); fastest of {args.repeats} "
            "repeat(s)",
            f"- memory budget: {args.memory_budget_gib} GiB = {report.budget_bytes / _MIB:.1f} "
            "MiB for weights + KV cache (activations not counted); batches over it are not run",
            "- tokens/s: batch * decode steps / decode time; latency: decode time / decode steps; "
            "prefill: the prompt's forward",
            "- FFN widths: computed to give GQA and MQA the parameters of MHA (the paper widened "
            "x1.3 for GQA and x1.33 for MQA at 30B); the multiplier depends on the shape",
            "- each cached kv head serves its group of query heads through SDPA's enable_gqa "
            "(no copy; on CUDA with an explicit mask, K and V are repeated instead), so GQA "
            "and MQA hold and read a smaller cache; the attention arithmetic stays MHA's",
            "",
            "## Variants",
            "",
            variants_table(report.variants, report.weight_bytes, report.budget_bytes, max_len),
            "",
            "## Results",
            "",
            results_table(report.variants, report.rows),
            "",
            summary(report),
            "",
            "## Configs",
            "",
            "```json",
            json.dumps(configs, indent=2),
            "```",
            "",
        ]
    )


def plot(report: Report, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for v in report.variants:
        rows = [r for r in report.rows if r.variant == v.name and r.fits]
        oom = [r.batch_size for r in report.rows if r.variant == v.name and not r.fits]
        label = v.label + (f": OOM from batch {min(oom)}" if oom else "")
        xs = [r.ms_per_token for r in rows]
        ys = [r.tokens_per_s for r in rows]
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(
                str(r.batch_size),
                (x, y),
                textcoords="offset points",
                xytext=(5, -10),
                fontsize=8,
                color=line.get_color(),
            )
    # From zero, as in the paper's figure: the gaps between the lines read as ratios.
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("latency per token (ms per decode step)")
    ax.set_ylabel("throughput (generated tokens/s)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title="points: batch size", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Command line ---------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gqa.py",
        description="Inference throughput vs latency of MHA, GQA and MQA at equal parameters.",
    )
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=8)
    # 16 heads, so that heads / 8 kv heads (the 34B and 70B ratio) is GQA and not MQA.
    parser.add_argument("--n-heads", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument(
        "--gqa-kv-heads", type=int, default=None, help="default: n_heads / 8, as Llama 2 34B/70B"
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], metavar="B"
    )
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps")
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        default=0.0625,
        help="weights + KV cache allowed per variant (default 0.0625 = 64 MiB: with the default "
        "shape in float32 MHA fits up to batch 20, GQA and MQA beyond 64)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point; fastest")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda if available, else cpu",
    )
    parser.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="default: bfloat16 on cuda, float32"
    )
    parser.add_argument("--out-md", type=Path, default=None, metavar="PATH")
    parser.add_argument("--out-png", type=Path, default=None, metavar="PATH")
    args = parser.parse_args(argv)

    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.gqa_kv_heads is None:
        args.gqa_kv_heads = args.n_heads // 8
    if not 1 < args.gqa_kv_heads < args.n_heads or args.n_heads % args.gqa_kv_heads:
        parser.error(
            f"--gqa-kv-heads={args.gqa_kv_heads} must divide --n-heads={args.n_heads} and lie "
            "strictly between 1 (MQA) and n_heads (MHA); pass it explicitly when n_heads < 16"
        )
    for name in ("prompt_len", "new_tokens", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    if min(args.batch_sizes) <= 0:
        parser.error(f"--batch-sizes {args.batch_sizes} must all be positive")
    if not args.memory_budget_gib > 0:
        parser.error(f"--memory-budget-gib={args.memory_budget_gib} must be > 0")
    args.batch_sizes = sorted(set(args.batch_sizes))
    return args


def main(argv: Sequence[str] | None = None) -> Report:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    try:
        base = LlamaConfig(
            dim=args.dim,
            n_layers=args.n_layers,
            n_heads=args.n_heads,
            vocab_size=args.vocab_size,
            max_seq_len=args.prompt_len + args.new_tokens,
        ).validate()
    except ValueError as err:
        raise SystemExit(f"gqa.py: error: {err}") from err
    variants = make_variants(base, args.gqa_kv_heads)
    for v in variants:
        print(
            f"{v.label}: ffn_hidden_dim {v.cfg.hidden_dim} (x{v.ffn_multiplier:.4f} of MHA), "
            f"{v.num_params:,} parameters ({v.param_diff:+.4%} vs MHA)",
            file=sys.stderr,
        )

    budget = int(args.memory_budget_gib * _GIB)
    rows, weights = run_benchmark(
        variants,
        batch_sizes=args.batch_sizes,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        budget_bytes=budget,
        repeats=args.repeats,
        device=device,
        dtype=dtype,
    )
    largest = {
        v.name: max((r.batch_size for r in rows if r.variant == v.name and r.fits), default=None)
        for v in variants
    }
    report = Report(variants, rows, budget, weights, largest, markdown="")
    report.markdown = render_markdown(report, args, argv, device)
    print(report.markdown)
    if args.out_md is not None:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(report.markdown)
    if args.out_png is not None:
        title = (
            f"MHA vs GQA vs MQA at equal parameters ({variants[0].num_params / 1e6:.1f}M): "
            f"dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads\n"
            f"prompt {args.prompt_len} + {args.new_tokens} decode steps, {args.dtype}, "
            f"budget {args.memory_budget_gib} GiB, {device_name(device)}"
        )
        plot(report, args.out_png, title)
    return report


if __name__ == "__main__":
    main()
