"""The pretraining loop: build, resume, train, evaluate, checkpoint, sample."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from llama_dist.checkpoint import ModelState
from llama_dist.checkpoint.init import check_init_from, is_hf_folder, load_initial_weights
from llama_dist.config import JobConfig, SampleConfig, run_device_type, validate_job
from llama_dist.data.indexed import (
    PretrainData,
    TrainLoader,
    ValidLoader,
    check_data_tokenizer,
)
from llama_dist.evaluation.periodic import PeriodicEvaluation, check_harness_tasks
from llama_dist.generate import complete, load_for_generation
from llama_dist.metrics.logger import plot_loss_curve
from llama_dist.models.llama import set_attention_backend
from llama_dist.parallel import build_mesh, dp_rank_and_size
from llama_dist.planner.launch_check import check_job_memory
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
from llama_dist.train.step import (
    GarbageCollection,
    StopSignal,
    TrainState,
    evaluate,
    forward_backward,
)

log = logging.getLogger("llama_dist.train.pretrain")

# End-of-run samples load the whole model on one CPU process: only for small models.
MAX_SAMPLE_PARAMS = 2_000_000_000


def sample_prompt_ids(tokenizer: Tokenizer, prompts: list[str]) -> list[list[int]]:
    """The end-of-run samples' prompts as token ids: BOS first, as prepared documents begin."""
    return [tokenizer.encode(p, bos=True) for p in prompts]


def check_tokenizer(path: str | None, vocab_size: int) -> Tokenizer | None:
    if path is None:
        return None
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tokenizer.vocab_size} pieces but model.vocab_size"
            f"={vocab_size}; set model.vocab_size={tokenizer.vocab_size}"
        )
    return tokenizer


def pretrain(cfg: JobConfig, run_dir: Path) -> TrainState:
    """Run (or resume) pretraining into `run_dir`; every rank calls this."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_cfg = validate_job(cfg, world_size)  # before any process group or model exists
    check_job_memory(
        model_cfg,
        parallel=cfg.parallel,
        train=cfg.train,
        seq_len=cfg.data.seq_len,
        world_size=world_size,
        device_type=run_device_type(cfg.train.device),
    )
    attention = cfg.model.resolve_attention(
        device_type=run_device_type(cfg.train.device), document_mask=cfg.data.document_mask
    )
    # Cheap checks only (files, sizes, the sidecar's vocabulary); indices come with the group.
    data = PretrainData(
        cfg.data, vocab_size=model_cfg.vocab_size, cache_dir=cfg.data.cache_folder(run_dir)
    )
    tokenizer = check_tokenizer(cfg.tokenizer, model_cfg.vocab_size)
    if tokenizer is not None:  # before the first step, not when the samples are written
        check_data_tokenizer(data.sources, tokenizer)
    if cfg.checkpoint.init_from:
        check_init_from(cfg.checkpoint.init_from, model_cfg)
    check_harness_tasks(cfg.harness)
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

    mesh = build_mesh(cfg.parallel, device=device.type)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    # Rank 0 builds the sample indices once, every rank maps them, before the first step; for
    # one step past the last, which the prefetcher reads ahead.
    data.prepare((cfg.train.steps + 1) * cfg.train.global_batch)
    loader = TrainLoader(
        data,
        global_batch=cfg.train.global_batch,
        micro_batch=cfg.train.micro_batch,
        dp_rank=dp_rank,
        dp_size=dp_size,
        prefetch=cfg.train.prefetch,
        device=device,
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
        total_steps=cfg.train.steps,
    )
    model, state, checkpoints = training.model, training.state, training.checkpoints
    set_attention_backend(model, attention)

    latest = resume_latest(checkpoints, training.states, resume=cfg.checkpoint.resume, job=cfg)
    if latest is not None:
        log.info("resumed from %s at step %d", latest, state.step)
    elif cfg.checkpoint.init_from:
        if is_hf_folder(cfg.checkpoint.init_from):  # each rank reads the slices of its shards
            load_initial_weights(model, cfg.checkpoint.init_from)
        else:
            checkpoints.load(Path(cfg.checkpoint.init_from), {"model": ModelState(model)})
        log.info("initialised weights from %s", cfg.checkpoint.init_from)

    metrics = metrics_logger(
        run_dir, cfg, train=cfg.train, total_steps=cfg.train.steps, start_step=state.step
    )
    eval_samples = cfg.train.eval_batches * cfg.train.micro_batch * dp_size or None
    valid_loader = ValidLoader(
        data,
        micro_batch=cfg.train.micro_batch,
        dp_rank=dp_rank,
        dp_size=dp_size,
        max_samples=eval_samples,
    )
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    throughput = throughput_meter(
        model_cfg, seq_len=cfg.data.seq_len, train=cfg.train, parallel=cfg.parallel, device=device
    )
    stop = StopSignal()
    collector = GarbageCollection(cfg.train.gc_every)
    batches = iter(loader)
    last_saved: Path | None = None

    harness = PeriodicEvaluation(
        cfg.harness,
        model=model,
        tokenizer=tokenizer,
        mesh=mesh,
        sequence_parallel=cfg.parallel.tp > 1 and cfg.parallel.sequence_parallel,
        total_steps=cfg.train.steps,
    )

    def validate(step: int) -> None:
        if data.num_valid_samples:  # data.valid_fraction=0 holds nothing out
            result = evaluate(model, valid_loader, parallel=cfg.parallel, device=device)
            metrics.log(step, result, kind="valid")
        scores = harness(step)
        if scores is not None:
            metrics.log(step, scores, kind="harness")

    try:
        if state.step == 0:  # the starting point of the validation curve
            validate(0)
        while state.step < cfg.train.steps:
            micro_batches = next(batches)
            loss = forward_backward(model, micro_batches, parallel=cfg.parallel, device=device).loss
            outcome = finish_step(
                training,
                loss,
                tokens=tokens_per_step,
                throughput=throughput,
                metrics=metrics,
                stop=stop,
                gc=collector,
            )
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
                metrics.log(state.step, step_metrics(outcome, training, throughput, device))
            saved, stopping = end_of_step(
                training,
                total_steps=cfg.train.steps,
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
        loader.close()
        checkpoints.close()
        stop.restore()
        collector.restore()
        metrics.close()

    dist.barrier()  # every checkpoint is complete; the other ranks are done
    if rank == 0:
        plot_loss_curve(run_dir)
        if state.step == cfg.train.steps and tokenizer is not None and last_saved is not None:
            if cfg.sample.prompts and model_cfg.num_params() <= MAX_SAMPLE_PARAMS:
                write_samples(cfg.sample, run_dir, last_saved, tokenizer, seed=cfg.train.seed)
            else:
                log.info("sample with: python launch/generate.py --checkpoint %s", last_saved)
    return state


def write_samples(
    s: SampleConfig, run_dir: Path, checkpoint: Path, tokenizer: Tokenizer, *, seed: int
) -> None:
    """Sample from the final checkpoint on one process (a plain, unsharded model)."""
    model, _ = load_for_generation(checkpoint, device=torch.device("cpu"), dtype=torch.float32)
    continuations = complete(
        model,
        tokenizer,
        sample_prompt_ids(tokenizer, s.prompts),
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        generator=torch.Generator().manual_seed(seed),
    )
    text = "\n".join(
        f"--- prompt: {p!r}\n{p}{c}\n" for p, c in zip(s.prompts, continuations, strict=True)
    )
    (run_dir / "samples.txt").write_text(text)
    print(f"samples from {checkpoint}:\n{text}", flush=True)


__all__ = ["pretrain"]
