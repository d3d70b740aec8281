"""The supervised fine-tuning loop: dialogs, answer-only loss, packed rows, any layout.

Starts from a pretraining checkpoint or an HF Llama folder (`init_from`), whose own config
gives the model's shape; resumes from this run's checkpoints exactly like pretraining.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from llama_dist.checkpoint.init import load_initial_weights, source_config
from llama_dist.config import (
    SampleConfig,
    SFTJobConfig,
    resolve_attention,
    run_device_type,
    validate_batch,
    validate_checkpoint,
    validate_optim,
    validate_sample,
)
from llama_dist.data.chat import encode_dialog
from llama_dist.data.sft import SFTData, SFTLoader, valid_batches
from llama_dist.generate import complete, load_for_generation
from llama_dist.metrics.logger import plot_loss_curve
from llama_dist.models.config import LlamaConfig
from llama_dist.models.llama import set_attention_backend
from llama_dist.parallel import build_mesh, dp_rank_and_size
from llama_dist.tokenizer import Tokenizer
from llama_dist.train.common import (
    build_training,
    end_of_step,
    finish_step,
    metrics_logger,
    open_run,
    refuse_fresh_start_over_checkpoints,
    resume_latest,
    step_metrics,
    throughput_meter,
)
from llama_dist.train.pretrain import MAX_SAMPLE_PARAMS, check_tokenizer
from llama_dist.train.step import (
    GarbageCollection,
    StopSignal,
    TrainState,
    evaluate,
    forward_backward,
)

log = logging.getLogger("llama_dist.train.sft")


def validate_sft(cfg: SFTJobConfig, world_size: int) -> LlamaConfig:
    """Check the job from config files alone (no data read, no process group); returns the
    model config, taken from `init_from`."""
    if not cfg.init_from:
        raise ValueError(
            "init_from is not set; point it at a pretraining checkpoint (runs/X/checkpoints) "
            "or a Hugging Face Llama folder"
        )
    if not cfg.tokenizer:
        raise ValueError("tokenizer is not set; pass the base model's tokenizer.model")
    model = source_config(cfg.init_from)
    if getattr(model, "output_dim", None) not in (None, model.vocab_size):
        raise ValueError(
            f"{cfg.init_from} holds a model with a {model.output_dim}-wide head (a reward "
            "model?); SFT starts from a language model"
        )
    cfg.data.validate()
    seq_len = cfg.data.seq_len
    if model.max_seq_len < seq_len:
        model = model.replace(max_seq_len=seq_len)
    cfg.parallel.validate(world_size, model, seq_len=seq_len)
    validate_batch(cfg.train, seq_len=seq_len, dp=cfg.parallel.dp)
    if not cfg.epochs > 0:
        raise ValueError(f"epochs={cfg.epochs} must be positive")
    validate_sample(cfg.sample)
    validate_checkpoint(cfg.checkpoint)
    return model


def planned_steps(data: SFTData, *, global_batch: int, epochs: float, steps: int | None) -> int:
    """Optimizer steps of `epochs` passes over the packed rows (an incomplete last batch is
    left out), or `steps` if that is fewer."""
    rows = sum(len(data.epoch_rows(e)) for e in range(math.floor(epochs)))
    if epochs % 1:
        rows += int(len(data.epoch_rows(math.floor(epochs))) * (epochs % 1))
    from_epochs = rows // global_batch
    if from_epochs == 0:
        raise ValueError(
            f"{epochs} epochs give {rows} packed rows, fewer than one global batch of "
            f"{global_batch}; lower train.global_batch_tokens or add data"
        )
    return min(steps, from_epochs) if steps else from_epochs


def sft(cfg: SFTJobConfig, run_dir: Path) -> TrainState:
    """Run (or resume) supervised fine-tuning into `run_dir`; every rank calls this."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_cfg = validate_sft(cfg, world_size)
    attention = resolve_attention(
        cfg.attention, device_type=run_device_type(cfg.train.device), document_mask=cfg.data.pack
    )
    tokenizer = check_tokenizer(cfg.tokenizer, model_cfg.vocab_size)
    assert tokenizer is not None
    # Before any process group: every rank reads (or tokenises) the same data and fails alike.
    data = SFTData(cfg.data, tokenizer, write_cache=int(os.environ.get("RANK", "0")) == 0)
    total_steps = planned_steps(
        data, global_batch=cfg.train.global_batch, epochs=cfg.epochs, steps=cfg.train.steps
    )
    validate_optim(cfg.optim, steps=total_steps, default_lr=2e-5)
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / cfg.checkpoint.folder
    refuse_fresh_start_over_checkpoints(checkpoint_dir, cfg.checkpoint.resume)

    device = open_run(
        run_dir,
        cfg,
        device=cfg.train.device,
        collective_timeout_s=cfg.train.collective_timeout_s,
    )
    rank = dist.get_rank()
    if rank == 0:
        log.info("SFT data: %s", data.stats)
        for skipped in data.skipped[:10]:
            log.warning("skipped record %s", skipped)
    mesh = build_mesh(cfg.parallel, device=device.type)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    loader = SFTLoader(
        data,
        global_batch=cfg.train.global_batch,
        micro_batch=cfg.train.micro_batch,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    training = build_training(
        model_cfg,
        parallel=cfg.parallel,
        mesh=mesh,
        device=device,
        optim=cfg.optim,
        train=cfg.train,
        checkpoint=cfg.checkpoint,
        checkpoint_dir=checkpoint_dir,
        loader=loader,
        total_steps=total_steps,
    )
    model, state, checkpoints = training.model, training.state, training.checkpoints
    set_attention_backend(model, attention)
    latest = resume_latest(checkpoints, training.states, resume=cfg.checkpoint.resume, job=cfg)
    if latest is not None:
        log.info("resumed from %s at step %d", latest, state.step)
    else:
        load_initial_weights(model, cfg.init_from)
        log.info("initialised weights from %s", cfg.init_from)

    metrics = metrics_logger(
        run_dir, cfg, train=cfg.train, total_steps=total_steps, start_step=state.step
    )
    if state.step == 0:
        metrics.log(0, data.stats, kind="data")
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    throughput = throughput_meter(
        model_cfg, seq_len=cfg.data.seq_len, train=cfg.train, parallel=cfg.parallel, device=device
    )
    stop = StopSignal()
    collector = GarbageCollection(cfg.train.gc_every)
    last_saved: Path | None = None

    def validate(step: int) -> None:
        if len(data.valid_ids):
            batches = valid_batches(
                data, micro_batch=cfg.train.micro_batch, dp_rank=dp_rank, dp_size=dp_size
            )
            result = evaluate(model, batches, parallel=cfg.parallel, device=device)
            metrics.log(step, result, kind="valid")

    try:
        if state.step == 0:
            validate(0)
        while state.step < total_steps:
            out = forward_backward(model, next(loader), parallel=cfg.parallel, device=device)
            outcome = finish_step(
                training,
                out.loss,
                tokens=tokens_per_step,
                throughput=throughput,
                metrics=metrics,
                stop=stop,
                gc=collector,
            )
            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                record = step_metrics(outcome, training, throughput, device)
                metrics.log(
                    state.step,
                    {
                        **record,
                        "answer_tokens": out.num_units,
                        "epoch": loader.epoch(),
                    },
                )
            saved, stopping = end_of_step(
                training,
                total_steps=total_steps,
                train=cfg.train,
                checkpoint=cfg.checkpoint,
                validate=validate,
                stop=stop,
                throughput=throughput,
                device=device,
            )
            last_saved = saved or last_saved
            if stopping:
                break
    finally:
        checkpoints.close()
        stop.restore()
        collector.restore()
        metrics.close()

    dist.barrier()
    if rank == 0:
        plot_loss_curve(run_dir)
        if state.step == total_steps and last_saved is not None:
            if model_cfg.num_params() <= MAX_SAMPLE_PARAMS:
                write_chat_samples(cfg.sample, run_dir, last_saved, tokenizer, seed=cfg.train.seed)
    return state


def write_chat_samples(
    s: SampleConfig, run_dir: Path, checkpoint: Path, tokenizer: Tokenizer, *, seed: int
) -> None:
    """Answers of the final checkpoint to `s.prompts` as user messages (one process)."""
    model, _ = load_for_generation(checkpoint, device=torch.device("cpu"), dtype=torch.float32)
    prompts = [encode_dialog(tokenizer, [{"role": "user", "content": p}]).ids for p in s.prompts]
    answers = complete(
        model,
        tokenizer,
        prompts,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        generator=torch.Generator().manual_seed(seed),
    )
    text = "\n".join(
        f"--- user: {p!r}\n{a.strip()}\n" for p, a in zip(s.prompts, answers, strict=True)
    )
    (run_dir / "samples.txt").write_text(text)
    print(f"chat samples from {checkpoint}:\n{text}", flush=True)


__all__ = ["planned_steps", "sft", "validate_sft"]
