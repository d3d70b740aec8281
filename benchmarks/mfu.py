"""Training-step throughput and MFU of llama_dist's Llama against Hugging Face LlamaForCausalLM.

Both models get the same shape, weights (ours converted with `to_hf_state_dict`), dtype, batch,
data and optimizer (`build_adamw`), on the same device, in the same run. A step is forward,
fp32 cross entropy, backward and the AdamW step. Every setting of the matrix
(implementation x micro-batch x activation checkpointing x compile) runs in a fresh process, so
peak memory and compile state belong to that setting alone, and ours and HF run back to back
for each setting, so a drift in machine load affects both alike. `--interleave` runs the
implementations of a setting in one process instead, alternating steps: the ratio is then
steady even on a busy host, at the price of per-model peak memory.

MFU follows ../shared/docs/llama2.md ("MFU convention"): model FLOPs per token from
`flops_per_token` (recomputation not counted), against `peak_flops(device)` on CUDA or
`--peak-tflops` elsewhere. See benchmarks/README.md for the columns.

Command line of benchmarks/results/cpu_small.md (about 9 minutes on an idle 2-core CPU):
`python benchmarks/mfu.py --preset small --n-layers 4 --seq-len 512 --micro-batch 1 2
--ac none selective full --compile off on --steps 4 --warmup 2 --stat min
--out benchmarks/results/cpu_small.md`
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama_dist.checkpoint.init import model_config_from_path
from llama_dist.host_memory import keep_freed_host_memory
from llama_dist.losses import cross_entropy_loss
from llama_dist.metrics.mfu import mfu, peak_flops
from llama_dist.models.config import PRESETS, LlamaConfig, get_preset
from llama_dist.models.flops import flops_per_token

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_AC_MODES = ("none", "full", "selective")
# HF has no selective recomputation; its `activation_checkpointing_enable` is full per layer.
_HF_AC_MODES = ("none", "full")
_WORKER_FLAG = "--run-setting"  # internal: argv of a setting's process is [flag, JSON spec]
_RESULT_PREFIX = "MFU_BENCH_RESULT "
# Candidate changes to src/llama_dist, measured on our model in the setting's process before
# making them: sdpa-gqa changes models/llama.py (see `patch_ours_`).
OURS_PATCHES = ("sdpa-gqa",)
_GIB = 2**30
# torch's CPU allocator puts allocations of 2 MiB and more on transparent huge pages when this
# is 1; it reads it once, at a process's first CPU allocation.
_HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


IMPLS = ("trainer", "ours", "hf")


@dataclass(frozen=True)
class Setting:
    """One row of the report: an implementation at one (micro-batch, ac, compile)."""

    impl: str  # "trainer" | "ours" | "hf"
    micro_batch: int
    ac: str  # none | full | selective
    compile: bool
    patches: tuple[str, ...] = ()  # OURS_PATCHES applied to our model

    @property
    def label(self) -> str:
        return " +".join((self.impl, *self.patches))


@dataclass
class Row:
    setting: Setting
    tokens_per_s: float | None = None  # per device, from step_time_s
    step_time_s: float | None = None  # median (or min, --stat) over the timed steps
    tflops: float | None = None  # model TFLOP/s per device
    mfu: float | None = None
    of_gemm: float | None = None  # model TFLOP/s over the measured GEMM rate
    peak_mem_gib: float | None = None
    first_loss: float | None = None  # loss of the first step: ours and HF must agree
    vs_hf: float | None = None  # ours / HF tokens/s for the same setting
    vs_hf_ac: str | None = None  # the HF ac mode compared with (full for our selective)
    error: str | None = None


@dataclass
class Report:
    rows: list[Row]
    flops_per_token: int
    model: LlamaConfig
    seq_len: int
    markdown: str
    env: dict[str, Any] = field(default_factory=dict)


# Command line ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training-step tokens/s, TFLOP/s, MFU and peak memory: llama_dist's Llama "
        "against HF LlamaForCausalLM on the same device and config.",
    )
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument(
        "--model-file",
        default=None,
        help="instead of --preset: an HF config.json, a model_config.json or a folder with one",
    )
    p.add_argument(
        "--n-layers", type=int, default=None, help="override the preset's depth (to fit a device)"
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: max_seq_len)"
    )
    p.add_argument("--micro-batch", type=int, nargs="+", default=[1], help="sequences per step")
    p.add_argument("--ac", nargs="+", default=["none"], choices=_AC_MODES)
    p.add_argument("--compile", nargs="+", default=["off"], choices=("off", "on"))
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, caches)")
    p.add_argument(
        "--stat",
        default="median",
        choices=("median", "min"),
        help="step time reported: median, or min on a shared host (other processes only ever "
        "slow a step down)",
    )
    p.add_argument("--dtype", default="auto", choices=("auto", *_DTYPES))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak dense TFLOP/s of one device; required for MFU off the known GPUs",
    )
    p.add_argument("--out", type=Path, default=None, help="write the report to this .md file")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument(
        "--impl",
        nargs="+",
        default=list(IMPLS),
        choices=IMPLS,
        help="trainer: the step launch/pretrain.py runs (FSDP2 over every rank, fp32 master "
        "weights, --dtype compute, fused AdamW, forward_backward + the guarded step); ours: the "
        "bare model in --dtype; hf: LlamaForCausalLM in --dtype. Under torchrun: trainer only",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="run ours and HF of each setting in one process, alternating steps: steadier "
        "ratios on a shared host, but no per-model peak memory",
    )
    p.add_argument(
        "--adamw",
        default="auto",
        choices=("auto", "fused", "foreach", "for-loop"),
        help="AdamW implementation for both models (build_adamw; auto = fused on CUDA and "
        "CPU, foreach elsewhere)",
    )
    p.add_argument(
        "--ours-patch",
        nargs="+",
        default=[],
        metavar="PATCH[,PATCH...]",
        help="also measure our model with candidate changes, one row per argument, each a "
        f"comma-separated list of {', '.join(OURS_PATCHES)} (applied in the setting's "
        "process; src is untouched)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads per setting (default: torch's)"
    )
    p.add_argument(
        "--huge-pages",
        default="off",
        choices=("on", "off"),
        help="host tensors of 2 MiB and more on transparent huge pages, for every "
        f"implementation alike ({_HUGE_PAGES_ENV}=1 in the settings' processes). Under "
        "torchrun the launching environment decides",
    )
    p.add_argument(
        "--host-malloc",
        default="keep",
        choices=("keep", "system"),
        help="keep: glibc keeps freed host memory for the next step, as CPU training runs do "
        "(llama_dist.host_memory), in every setting's process alike; system: glibc's defaults",
    )
    p.add_argument(
        "--gemm-rate",
        default="on",
        choices=("on", "off"),
        help=f"first measure a {GEMM_SIZE}^3 matmul in --dtype, in a process of its own with the "
        "settings' threads, and report each row's model TFLOP/s as a share of it (`of GEMM`)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and data")
    args = p.parse_args(argv)
    for name in ("steps", "n_layers", "seq_len", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be >= 1")
    if args.warmup < 0:
        raise ValueError(f"--warmup={args.warmup} must be >= 0")
    if any(b < 1 for b in args.micro_batch):
        raise ValueError(f"--micro-batch {args.micro_batch}: every size must be >= 1")
    args.ours_patch = [tuple(variant.split(",")) for variant in args.ours_patch]
    for variant in args.ours_patch:
        unknown = sorted(set(variant) - set(OURS_PATCHES))
        if unknown:
            raise ValueError(f"--ours-patch: unknown {unknown}; choose from {OURS_PATCHES}")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        # Only asks the driver for a device count; no CUDA context is created in this process.
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        # bf16 on CPUs without AVX512-BF16/AMX is emulated and ~15x slower than fp32.
        return "fp32" if device.type == "cpu" else "bf16"
    return name


def model_config(
    preset: str, n_layers: int | None, seq_len: int | None, model_file: str | None = None
) -> tuple[LlamaConfig, int]:
    overrides = {} if n_layers is None else {"n_layers": n_layers}
    if model_file is not None:
        cfg = model_config_from_path(model_file).replace(**overrides)
    else:
        cfg = get_preset(preset, **overrides)
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    if seq_len > cfg.max_seq_len:
        raise ValueError(
            f"--seq-len={seq_len} exceeds the {preset} preset's max_seq_len={cfg.max_seq_len}; "
            "choose a shorter sequence"
        )
    return cfg, seq_len


# The settings' processes -----------------------------------------------------------------------
def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0), so
    # the transient second copy of the weights while HF's are converted is not counted. Where
    # /proc is read-only the peak keeps it: an upper bound.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _cast_parameters_(model: torch.nn.Module, dtype: torch.dtype) -> None:
    # Parameters only: both models keep their rotary tables in fp32, as they are built.
    for p in model.parameters():
        p.data = p.data.to(dtype)


def _patched_attention_forward(patches: Sequence[str]) -> Callable:
    """`Attention.forward` (its training path) with the changes in `patches`: sdpa-gqa lets
    SDPA serve n_rep query heads per key/value head (enable_gqa) instead of copying each
    key/value head n_rep times."""
    from llama_dist.models.llama import apply_rotary as rotary

    sdpa_gqa = "sdpa-gqa" in patches

    def forward(self, x, cos, sin, mask, *, kv_cache=None) -> torch.Tensor:
        assert kv_cache is None, "the benchmark trains; no KV cache"
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        n_rep = q.shape[2] // k.shape[2]
        if n_rep > 1 and not sdpa_gqa:
            k = k.repeat_interleave(n_rep, dim=2)
            v = v.repeat_interleave(n_rep, dim=2)
        # (bsz, heads, seqlen, head_dim) for SDPA
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=n_rep > 1 and sdpa_gqa
        )
        out = out.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(out)

    return forward


def patch_ours_(model: torch.nn.Module, patches: Sequence[str]) -> None:
    """Give every attention layer of this model instance the patched forward; other instances
    and llama_dist itself are untouched."""
    if "sdpa-gqa" not in patches:
        return
    forward = _patched_attention_forward(patches)
    for block in model.layers.values():
        block.attention.forward = types.MethodType(forward, block.attention)


def build_ours(
    cfg: LlamaConfig,
    *,
    ac: str,
    compile: bool,
    patches: Sequence[str],
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> torch.nn.Module:
    from llama_dist.parallel import ACConfig, ParallelConfig, build_llama
    from llama_dist.parallel.ac import apply_ac
    from llama_dist.parallel.parallelize import apply_compile

    parallel = ParallelConfig(ac=ACConfig(mode=ac), compile=compile)
    parallel.ac.validate()
    # mesh=None: a plain single-device model, built on meta and materialized on `device`.
    model = build_llama(cfg, parallel, None, device=device, seed=seed)
    _cast_parameters_(model, dtype)
    patch_ours_(model, patches)
    # The order of parallelize_llama: recomputation first, then compile sees the whole region.
    apply_ac(model, parallel.ac)
    if parallel.compile:
        apply_compile(model)
    return model


def build_hf(
    cfg: LlamaConfig,
    *,
    ac: str,
    compile: bool,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> torch.nn.Module:
    import transformers

    from llama_dist.models.hf_adapter import config_to_hf, to_hf_state_dict
    from llama_dist.parallel import ParallelConfig, build_llama

    if ac not in _HF_AC_MODES:
        raise ValueError(f"HF has no ac mode {ac!r}; only {_HF_AC_MODES}")
    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg, dtype), attn_implementation="sdpa")
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg)
    # The same weights as ours, so both compute the same losses from the same data.
    ours = build_llama(cfg, ParallelConfig(), None, device=device, seed=seed)
    model.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    del ours
    _cast_parameters_(model, dtype)
    model.train()
    if ac == "full":
        # Non-reentrant, no RNG stashing: the same checkpoint call as ours (parallel/ac.py).
        kwargs = {"use_reentrant": False, "preserve_rng_state": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if compile:
        # Per decoder layer, the granularity of our apply_compile.
        for layer in model.model.layers:
            layer.forward = torch.compile(layer.forward)
    return model


class TrainerStep:
    """The pretraining loop's step: `build_llama` on the process group's mesh (FSDP2 mixed
    precision: fp32 master weights, `dtype` compute, fp32 gradient reduction), the job's
    AdamW and schedule, `forward_backward` and the guarded optimizer step (one host sync)."""

    def __init__(self, cfg: LlamaConfig, spec: dict[str, Any], device: torch.device) -> None:
        from llama_dist.config import OptimConfig
        from llama_dist.parallel import ACConfig, ParallelConfig, build_llama, build_mesh
        from llama_dist.parallel.mesh import init_distributed
        from llama_dist.train.common import GuardedStep, build_optimizer

        init_distributed(device=device.type)
        self.parallel = ParallelConfig(
            ac=ACConfig(mode=spec["ac"]),
            compile=spec["compile"],
            param_dtype=spec["dtype"],
            reduce_dtype="fp32",
        ).validate(dist.get_world_size(), cfg)
        mesh = build_mesh(self.parallel, device=device.type)
        self.model = build_llama(cfg, self.parallel, mesh, device=device, seed=spec["seed"])
        optim = OptimConfig(lr=3e-4, warmup_steps=0, implementation=spec["adamw"])
        optimizer, scheduler = build_optimizer(self.model, optim, total_steps=10**6)
        self.step = GuardedStep(
            optimizer,
            scheduler,
            list(self.model.parameters()),
            clip_grad_norm=optim.clip_grad_norm,
            max_nonfinite=10**6,
        )
        self.device = device
        self.count = 0

    def __call__(self, tokens: torch.Tensor) -> float:
        from llama_dist.train.step import forward_backward

        out = forward_backward(
            self.model, [{"tokens": tokens}], parallel=self.parallel, device=self.device
        )
        self.count += 1
        return self.step(out.loss, step=self.count).loss


def run_group(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the models of `spec["models"]` (one per process, unless --interleave) and train
    each `warmup + steps` steps, taking turns step by step, so that a change of machine load
    hits all of them alike. Peak memory is measured for a single model only."""
    from llama_dist.parallel import build_adamw

    device = torch.device(spec["device"])
    dtype = _DTYPES[spec["dtype"]]
    cfg = LlamaConfig.from_dict(spec["model"])
    seq_len, micro_batch = spec["seq_len"], spec["micro_batch"]
    torch.manual_seed(spec["seed"])
    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kept = spec["host_malloc"] == "keep" and keep_freed_host_memory()
    host_malloc = "keep" if kept else "system"
    if any(m["impl"] == "hf" for m in spec["models"]):
        import transformers  # noqa: F401  (before the baseline: imports are not the setting's)
    rss_before = _rss_bytes("VmRSS")

    common = dict(ac=spec["ac"], compile=spec["compile"], dtype=dtype, device=device)
    runs = []
    for m in spec["models"]:
        if m["impl"] == "trainer":
            runs.append(("trainer", TrainerStep(cfg, spec, device), None))
            continue
        if m["impl"] == "ours":
            model = build_ours(cfg, patches=m["patches"], seed=spec["seed"], **common)
        else:
            model = build_hf(cfg, seed=spec["seed"], **common)
        runs.append((m["impl"], model, build_adamw(model, lr=3e-4, implementation=spec["adamw"])))
    gen = torch.Generator(device="cpu").manual_seed(spec["seed"])
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), generator=gen)
    tokens = tokens.to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()

    step_times: list[list[float]] = [[] for _ in runs]
    losses: list[list[float]] = [[] for _ in runs]
    for _ in range(spec["warmup"] + spec["steps"]):
        for i, (impl, model, optimizer) in enumerate(runs):
            sync()
            start = time.perf_counter()
            if impl == "trainer":
                loss_value = model(tokens)  # the step's own sync brings the loss back
            else:
                if impl == "ours":
                    # The loss in the head, chunk by chunk, as forward_backward computes it.
                    loss = model(inputs, labels=labels)
                else:
                    logits = model(input_ids=inputs, use_cache=False).logits
                    loss = cross_entropy_loss(logits, labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sync()
            step_times[i].append(time.perf_counter() - start)
            losses[i].append(loss_value if impl == "trainer" else loss.item())

    if len(runs) > 1:
        peak_mem = None
    elif device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device)
    else:
        # What this setting added to the process: runtime and imports are not counted.
        peak_mem = _rss_bytes("VmHWM") - rss_before
    results = [
        {
            "step_times": times[spec["warmup"] :],
            "first_step_s": times[0],
            "losses": model_losses,
            "peak_mem_bytes": peak_mem,
        }
        for times, model_losses in zip(step_times, losses, strict=True)
    ]
    return {
        "results": results,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "num_threads": torch.get_num_threads(),
        "huge_pages": os.environ.get(_HUGE_PAGES_ENV, "0") == "1",
        "host_malloc": host_malloc,
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


GEMM_SIZE = 4096  # the measured GEMM: square, large enough to run at the BLAS's best


def measure_gemm_rate(spec: dict[str, Any]) -> dict[str, Any]:
    """FLOP/s of a GEMM_SIZE^3 matmul in the run's dtype and threads: the fastest of 5 after
    2 untimed; what the device's matrix units actually deliver, for the `of GEMM` column."""
    device = torch.device(spec["device"])
    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    gen = torch.Generator(device="cpu").manual_seed(0)
    a, b = (
        torch.randn(GEMM_SIZE, GEMM_SIZE, generator=gen).to(device, _DTYPES[spec["dtype"]])
        for _ in range(2)
    )
    times = []
    for i in range(7):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"gemm_flops": 2 * GEMM_SIZE**3 / min(times), "num_threads": torch.get_num_threads()}


def worker_main(spec_json: str) -> None:
    """Entry point of a setting's process: run it, print the result as one JSON line."""
    spec = json.loads(spec_json)
    try:
        result = measure_gemm_rate(spec) if spec.get("gemm") else run_group(spec)
    except torch.OutOfMemoryError:
        result = {"error": "OOM"}
    print(_RESULT_PREFIX + json.dumps(result), flush=True)


def spawn_group(spec: dict[str, Any]) -> dict[str, Any]:
    """Run `run_group(spec)` in a fresh Python process and return its result (or an error)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), _WORKER_FLAG, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX) :])
    tail = proc.stderr.strip().splitlines()[-20:]
    sys.stderr.write("\n".join(tail) + "\n")
    last = tail[-1] if tail else f"exit status {proc.returncode}"
    return {"error": last[:120]}


# The matrix and the report ---------------------------------------------------------------------
def setting_groups(args: argparse.Namespace) -> list[list[Setting]]:
    """The settings, grouped by the process they run in. For each (micro-batch, ac, compile):
    ours, ours with --ours-patch if given, then HF where HF has the ac mode; each in a process
    of its own, or all in one with --interleave."""
    groups = []
    for micro_batch in args.micro_batch:
        for ac in args.ac:
            for compile_mode in args.compile:
                on = compile_mode == "on"
                group = []
                if "trainer" in args.impl:
                    group.append(Setting("trainer", micro_batch, ac, on))
                if "ours" in args.impl and not under_torchrun():
                    group.append(Setting("ours", micro_batch, ac, on))
                    for patches in args.ours_patch:
                        group.append(Setting("ours", micro_batch, ac, on, patches))
                hf = "hf" in args.impl and not args.no_hf and not under_torchrun()
                if hf and ac in _HF_AC_MODES:
                    group.append(Setting("hf", micro_batch, ac, on))
                if not group:
                    continue
                if args.interleave and "trainer" in args.impl and len(group) > 1:
                    # The trainer joins a process group: it runs in a process of its own.
                    groups.append(group[:1])
                    group = group[1:]
                groups.extend([group] if args.interleave else [[s] for s in group])
    return groups


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return cpu_name()
    # In a child process: a CUDA context here would hold device memory for the whole run.
    code = "import sys, torch; print(torch.cuda.get_device_name(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(device)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def resolve_peak(device: torch.device, dtype: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device, or None (no MFU) for a CPU without --peak-tflops."""
    override = None if override_tflops is None else override_tflops * 1e12
    if device.type != "cuda" and override is None:
        return None
    try:
        return peak_flops(_device_name(device), dtype=dtype, override=override)
    except ValueError as err:
        raise ValueError(f"{err}. Pass --peak-tflops to give it") from None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(row: Row) -> str:
    if row.vs_hf is None:
        return "-"
    against = "" if row.vs_hf_ac == row.setting.ac else f" (vs HF {row.vs_hf_ac})"
    return f"{row.vs_hf:.2f}x{against}"


def table(rows: list[Row]) -> str:
    head = (
        "| impl | micro-batch | ac | compile | tokens/s/device | TFLOP/s | MFU | of GEMM "
        "| peak mem (GiB) | step (s) | first loss | ours/HF |\n"
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        s = r.setting
        cells = [
            s.label,
            str(s.micro_batch),
            s.ac,
            "on" if s.compile else "off",
        ]
        if r.error is not None:
            cells += [f"failed: {r.error}"] + ["-"] * 7
        else:
            cells += [
                _fmt(r.tokens_per_s, ",.0f"),
                _fmt(r.tflops, ".4g"),
                "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
                "-" if r.of_gemm is None else f"{100 * r.of_gemm:.0f}%",
                _fmt(r.peak_mem_gib, ".2f"),
                _fmt(r.step_time_s, ".3f"),
                _fmt(r.first_loss, ".4f"),
                _ratio(r),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def header(env: dict[str, Any], cfg: LlamaConfig, seq_len: int, fpt: int, argv: list[str]) -> str:
    peak = env["peak_flops"]
    peak_text = "none given (no MFU)" if peak is None else f"{peak / 1e12:.1f} TFLOP/s"
    gemm = env["gemm_flops"]
    gemm_text = (
        "not measured (no `of GEMM`)"
        if gemm is None
        else f"{gemm / 1e12:.4g} TFLOP/s ({GEMM_SIZE}^3 matmul in {env['dtype']}, fastest of 5, "
        "in a process of its own with the settings' threads); `of GEMM` is a row's model "
        "TFLOP/s over it"
    )
    command = "python benchmarks/mfu.py " + shlex.join(argv)
    model = json.dumps(cfg.to_dict())
    return (
        "# Training-step throughput: llama_dist Llama vs Hugging Face LlamaForCausalLM\n\n"
        f"- date: {env['date']}\n"
        f"- device: {env['device']} ({env['device_name']}), dtype {env['dtype']}\n"
        f"- torch {env['torch']}, transformers {env['transformers']}, python {env['python']}\n"
        f"- CPU threads (torch): {env['num_threads']}, host CPUs: {env['cpu_count']}\n"
        f"- command: `{command}`\n"
        f"- model: `{model}`\n"
        f"- parameters {cfg.num_params():,} ({cfg.num_params(exclude_embedding=True):,} without "
        f"the embedding), seq_len {seq_len}, model FLOPs/token {fpt:,}\n"
        f"- peak for MFU: {peak_text}\n"
        f"- measured GEMM rate: {gemm_text}\n"
        f"- {env['steps']} timed steps after {env['warmup']} warmup steps, {env['processes']}; "
        "a step is forward + fp32 cross entropy + backward + AdamW step "
        f"({env['adamw']}); tokens/s from the {env['stat']} step time\n"
        "- trainer: the step launch/pretrain.py runs: FSDP2 over the process group (fp32 "
        "master weights, compute in the dtype above, fp32 gradient reduction), fused AdamW, "
        "forward_backward and the guarded step with its one host sync; ours: the bare model "
        "with its parameters in the dtype above; both compute the cross entropy in the head, "
        "chunk by chunk (linear_cross_entropy)\n"
        "- HF: sdpa attention, the same weights, logits then the same fp32 cross entropy; "
        "ac full = activation checkpointing of every "
        "decoder layer (non-reentrant), compile on = torch.compile per decoder layer\n"
        f"- host tensors of 2 MiB and more on transparent huge pages: "
        f"{env['huge_pages']}, for every implementation alike "
        f"({_HUGE_PAGES_ENV}, --huge-pages)\n"
        f"- freed host memory kept for the next step (glibc mmap threshold 32 MiB, no trim): "
        f"{env['host_malloc']}, for every implementation alike (--host-malloc)\n"
        f"- load average (1 min) at start {env['load_start']:.2f}, at end {env['load_end']:.2f}"
        "\n"
    )


def main(argv: Sequence[str] | None = None) -> Report:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not under_torchrun():
        # The settings' processes inherit it; torch reads it at a process's first tensor.
        os.environ[_HUGE_PAGES_ENV] = "1" if args.huge_pages == "on" else "0"
    device = resolve_device(args.device)
    if under_torchrun() and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dtype = resolve_dtype(args.dtype, device)
    cfg, seq_len = model_config(args.preset, args.n_layers, args.seq_len, args.model_file)
    fpt = flops_per_token(cfg, seq_len)
    peak = resolve_peak(device, dtype, args.peak_tflops)
    load_start = os.getloadavg()[0]

    gemm_flops = None
    if args.gemm_rate == "on":
        spec = {"gemm": True, "device": str(device), "dtype": dtype, "threads": args.threads}
        res = measure_gemm_rate(spec) if under_torchrun() else spawn_group(spec)
        if "error" in res:
            print(f"GEMM rate not measured: {res['error']}", file=sys.stderr, flush=True)
        else:
            gemm_flops = res["gemm_flops"]

    results: dict[Setting, dict[str, Any]] = {}
    info_keys = ("device_name", "num_threads", "huge_pages", "host_malloc")
    env_info = {"device_name": "?", "num_threads": "?", "huge_pages": None, "host_malloc": "?"}
    for group in setting_groups(args):
        first = group[0]
        spec = {
            "models": [{"impl": s.impl, "patches": list(s.patches)} for s in group],
            "micro_batch": first.micro_batch,
            "ac": first.ac,
            "compile": first.compile,
            "model": cfg.to_dict(),
            "seq_len": seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "dtype": dtype,
            "device": str(device),
            "seed": args.seed,
            "adamw": args.adamw,
            "threads": args.threads,
            "host_malloc": args.host_malloc,
        }
        start = time.perf_counter()
        res = run_group(spec) if under_torchrun() else spawn_group(spec)
        if "error" in res:
            results.update({s: res for s in group})
            status = res["error"]
        else:
            env_info = {k: res[k] for k in info_keys}
            results.update(zip(group, res["results"], strict=True))
            status = ", ".join(f"{r['first_step_s']:.1f}" for r in res["results"])
            status = f"first step {status} s"
        print(
            f"[{' / '.join(s.label for s in group)} micro-batch {first.micro_batch} ac "
            f"{first.ac} compile {'on' if first.compile else 'off'}] "
            f"{time.perf_counter() - start:.0f} s ({status})",
            file=sys.stderr,
            flush=True,
        )

    rows = []
    for setting, res in results.items():
        if "error" in res:
            rows.append(Row(setting, error=res["error"]))
            continue
        step = (min if args.stat == "min" else statistics.median)(res["step_times"])
        tps = setting.micro_batch * seq_len / step
        rows.append(
            Row(
                setting,
                tokens_per_s=tps,
                step_time_s=step,
                tflops=tps * fpt / 1e12,
                mfu=None
                if peak is None
                else mfu(tokens_per_s=tps, flops_per_token=fpt, num_devices=1, peak=peak),
                of_gemm=None if gemm_flops is None else tps * fpt / gemm_flops,
                peak_mem_gib=None
                if res["peak_mem_bytes"] is None
                else res["peak_mem_bytes"] / _GIB,
                first_loss=res["losses"][0],
            )
        )
    by_setting = {r.setting: r for r in rows}
    for r in rows:
        s = r.setting
        if s.impl not in ("ours", "trainer") or r.tokens_per_s is None:
            continue
        # Selective recomputation has no HF counterpart; HF's full recomputation is the
        # memory-saving mode an HF user would pick instead.
        hf_ac = "full" if s.ac == "selective" else s.ac
        hf = by_setting.get(Setting("hf", s.micro_batch, hf_ac, s.compile))
        if hf is not None and hf.tokens_per_s is not None:
            r.vs_hf, r.vs_hf_ac = r.tokens_per_s / hf.tokens_per_s, hf_ac

    env = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "device": str(device),
        "device_name": env_info["device_name"],
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "python": platform.python_version(),
        "num_threads": env_info["num_threads"],
        "cpu_count": os.cpu_count(),
        "peak_flops": peak,
        "steps": args.steps,
        "warmup": args.warmup,
        "adamw": _adamw_name(args.adamw, device),
        "stat": "fastest" if args.stat == "min" else "median",
        "processes": "the models of a setting in one process, taking turns step by step "
        "(--interleave)"
        if args.interleave
        else "each setting in a fresh process",
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "huge_pages": {True: "on", False: "off", None: "?"}[env_info["huge_pages"]],
        "host_malloc": env_info["host_malloc"],
        "gemm_flops": gemm_flops,
    }
    markdown = header(env, cfg, seq_len, fpt, argv) + "\n" + table(rows)
    if under_torchrun():
        world = dist.get_world_size() if dist.is_initialized() else 1
        markdown = markdown.replace(
            "\n| impl |", f"\nUnder torchrun: {world} ranks, figures per device.\n\n| impl |", 1
        )
        if dist.is_initialized():
            dist.destroy_process_group()
        if int(os.environ.get("RANK", "0")) != 0:
            return Report(rows, fpt, cfg, seq_len, markdown, env)
    print(markdown)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown)
    return Report(rows, fpt, cfg, seq_len, markdown, env)


def _adamw_name(implementation: str, device: torch.device) -> str:
    if implementation != "auto":
        return f"AdamW {implementation}"
    # build_adamw's rule for "auto"
    return f"AdamW auto = {'fused' if device.type in ('cuda', 'cpu') else 'foreach'}"


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == _WORKER_FLAG:
        worker_main(sys.argv[2])
    else:
        try:
            main()
        except ValueError as err:  # bad arguments or input files: one line, no traceback
            print(f"mfu.py: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
