"""Where training metrics go: the console (a progress bar on rank 0), `metrics.jsonl` in the
run folder, and wandb (offline unless the user is logged in)."""

from __future__ import annotations

import json
import os
import resource
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: the CUDA allocator's peak on GPUs, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


WANDB_ID_FILE = "wandb_run_id"


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


# The kind of the row a restarted run writes first: the step it resumed from.
RESUME = "resume"


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        use_wandb: bool,
        wandb_project: str,
        config: dict[str, Any],
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        if self.path.is_file() and self.path.stat().st_size:
            # A restart: what the earlier attempt logged after the checkpoint it resumes from
            # is superseded (see `read_metrics`).
            torn = not self.path.read_bytes().endswith(b"\n")
            with open(self.path, "a") as f:
                # A line the crash cut short ends here; readers skip it.
                f.write("\n" * torn)
                f.write(json.dumps({"step": start_step, "kind": RESUME, "time": time.time()}))
                f.write("\n")
        self._bar = tqdm(
            total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )
        if use_wandb:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
            # One wandb run per training run: a restarted or requeued job continues it.
            id_file = Path(run_dir) / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            self._wandb = wandb.init(
                id=run_id,
                project=wandb_project,
                dir=str(run_dir),
                config=config,
                mode=mode,
                name=Path(run_dir).name,
                resume="allow",
            )
            self._wandb.define_metric("trainer/step")
            self._wandb.define_metric("*", step_metric="trainer/step")

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def log(self, step: int, metrics: dict[str, float], *, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        if self._bar is not None:
            self._bar.write(f"[{kind} step {step}] {shown}")
        if self._wandb is not None:
            # The training step is a metric, not wandb's own step counter: a job resumed from
            # an earlier checkpoint logs steps again, which wandb's counter would drop.
            self._wandb.log(
                {"trainer/step": step, **{f"{kind}/{k}": v for k, v in metrics.items()}}
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def _fmt(value: float) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, each step once: where a restarted run resumed
    from step S (a RESUME row), the rows the earlier attempt logged after S, or all of them
    when S is 0 (a start from scratch logs step 0 again), are left out. Lines cut short by a
    crash are left out too."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records: list[dict[str, Any]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # rows are written whole: only a crash leaves a partial one
        if record.get("kind") == RESUME:
            start = record["step"]
            records = [r for r in records if r["step"] <= start] if start > 0 else []
            continue
        records.append(record)
    return records


def plot_loss_curve(run_dir: Path) -> Path | None:
    """Train and validation loss against step, as `loss_curve.png` in the run folder; beside
    it, when the run evaluated harness tasks (kind "harness"), one panel per task metric
    (perplexities on a log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and "loss" in r]
    valid = [(r["step"], r["loss"]) for r in records if r["kind"] == "valid" and "loss" in r]
    if not train:
        return None
    harness = harness_curves(records)
    cols = min(3, 1 + len(harness))
    rows = -(-(1 + len(harness)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 if cols == 1 else 4.6 * cols, 4.5 * rows))
    axes = list(getattr(axes, "flat", [axes]))
    ax = axes[0]
    ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation loss", linewidth=1.5)
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(f"{Path(run_dir).name}: loss")
    ax.legend()
    for ax, (name, points) in zip(axes[1:], harness.items(), strict=False):
        ax.plot(*zip(*points, strict=True), "o-", color="tab:green", linewidth=1.2)
        values = [v for _, v in points]
        if "perplexity" in name:
            ax.set_yscale("log")
        elif 0 <= min(values) and max(values) <= 1:  # a rate: its whole range, noise to scale
            ax.set_ylim(-0.02, 1.02)
        task, _, metric = name.partition("/")
        ax.set_title(f"{task}\n{metric}", fontsize=9)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in axes[1 + len(harness) :]:
        ax.set_visible(False)
    out = Path(run_dir) / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def harness_curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """ "TASK/METRIC" -> [(step, value), ...] of the harness rows of a run's metrics."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record["kind"] != "harness":
            continue
        for key, value in record.items():
            if key not in ("step", "kind", "time"):
                curves.setdefault(key, []).append((record["step"], value))
    return curves
