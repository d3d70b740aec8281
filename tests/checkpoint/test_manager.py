"""Training checkpoints (CPU, gloo, real processes): round trip, resharding, atomic step folders.

Launches are shared: one on 2 ranks (FSDP round trip, async save, retention, a crash mid-save,
and loading the 4-rank checkpoint at FSDP 2) and one on 4 ranks (save at FSDP 4, load at
dp 2 x tp 2, and load a single-process checkpoint). Single-process checks run in the test
process without a process group.

Checkpoints store fp32 tensors as they are, so every comparison of loaded state is bitwise;
the loss of the step after a resume equals the uninterrupted run's exactly, as both runs
execute the same operations on the same values.
"""

from __future__ import annotations

import copy
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LinearLR

from llama_dist.checkpoint import (
    CheckpointManager,
    ModelState,
    OptimizerState,
    find_checkpoint,
    load_model_checkpoint,
    rng_state,
    set_rng_state,
)
from llama_dist.losses import cross_entropy_loss
from llama_dist.models import LlamaConfig
from llama_dist.parallel import (
    ParallelConfig,
    build_adamw,
    build_llama,
    build_mesh,
    dp_rank_and_size,
    loss_context,
)
from llama_dist.testing.distributed import run_distributed

MODEL = LlamaConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64
).validate()
STEPS, GLOBAL_BATCH, SEQ = 6, 4, 16
FSDP = ParallelConfig()
DP2_TP2 = ParallelConfig(tp=2)
LOGGER = "llama_dist.checkpoint.manager"


def batches() -> torch.Tensor:
    """(STEPS, GLOBAL_BATCH, SEQ + 1) sequences counting up by a stride of 1, 2 or 3."""
    gen = torch.Generator().manual_seed(1234)
    start = torch.randint(0, MODEL.vocab_size, (STEPS, GLOBAL_BATCH, 1), generator=gen)
    stride = torch.randint(1, 4, (STEPS, GLOBAL_BATCH, 1), generator=gen)
    return (start + stride * torch.arange(SEQ + 1)) % MODEL.vocab_size


class Trainer:
    """A model, AdamW, a scheduler and loop counters on one layout (None: one plain process)."""

    def __init__(self, layout: ParallelConfig | None, seed: int) -> None:
        if layout is None:
            self.layout, self.mesh = ParallelConfig(dp_shard=1), None
        else:
            self.layout = copy.deepcopy(layout).validate(dist.get_world_size(), MODEL, seq_len=SEQ)
            self.mesh = build_mesh(self.layout)
        self.model = build_llama(
            MODEL, self.layout, self.mesh, device=torch.device("cpu"), seed=seed
        )
        self.optimizer = build_adamw(self.model, lr=1e-2)
        self.scheduler = LinearLR(self.optimizer, start_factor=0.5, total_iters=10)
        self.train = {"step": 0, "consumed_samples": 0}

    def states(self) -> dict:
        return {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, self.optimizer),
            "scheduler": self.scheduler,
            "train": self.train,
        }

    def step(self, batch: torch.Tensor) -> float:
        dp_rank, dp_size = dp_rank_and_size(self.mesh) if self.mesh is not None else (0, 1)
        local = batch.chunk(dp_size)[dp_rank]
        with loss_context(self.layout):
            loss = cross_entropy_loss(self.model(local[:, :-1]), local[:, 1:])
            loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.train["step"] += 1
        self.train["consumed_samples"] += len(batch)
        loss = full(loss)
        if self.mesh is not None:
            # Tensor-parallel ranks hold the same loss, so the world mean is the dp mean.
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        return loss.item()

    def snapshot(self) -> dict:
        """Full copies of everything a checkpoint holds: nothing aliases live state (trap 4)."""
        optim = OptimizerState(self.model, self.optimizer).state_dict()
        return {
            "params": {n: full(p) for n, p in self.model.named_parameters()},
            "optimizer": {
                k: full(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                for k, v in optim.items()
            },
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "train": dict(self.train),
        }


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def seed_rngs() -> None:
    """Different generator states on every rank, as in a real run."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(100 + rank)
    random.seed(200 + rank)
    np.random.seed(300 + rank)


def draw() -> tuple:
    return torch.rand(4), random.random(), np.random.rand()


def assert_draws_equal(got: tuple, expected: tuple) -> None:
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def assert_snapshots_equal(got: dict, expected: dict) -> None:
    for part in ("params", "optimizer"):
        assert got[part].keys() == expected[part].keys(), part
        for key, value in expected[part].items():
            if isinstance(value, torch.Tensor):
                assert got[part][key].dtype == value.dtype, key
                assert torch.equal(got[part][key], value), key
            else:
                assert got[part][key] == value, key
    assert got["scheduler"] == expected["scheduler"]
    assert got["train"] == expected["train"]


class _CrashingWriter(dcp.FileSystemWriter):
    """Rank 1 fails while writing its shards; rank 0's data is already on disk."""

    def write_data(self, plan, planner):
        if dist.get_rank() == 1:
            raise OSError("simulated crash while writing")
        return super().write_data(plan, planner)


class _CrashingManager(CheckpointManager):
    def _storage_writer(self, path: Path) -> dcp.FileSystemWriter:
        return _CrashingWriter(path)


class _FailingFinalize(CheckpointManager):
    """Rank 0 fails to move a fully written checkpoint into place."""

    def _finalize(self, tmp: Path, final: Path, started: float) -> None:
        raise OSError("simulated: no space left on device")


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def capture_logs() -> list[str]:
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    logger.addHandler(Collect())
    return messages


# Workers ----------------------------------------------------------------------------------
def two_rank_checks(root: Path, fsdp4_checkpoint: Path) -> dict:
    data = batches()
    seed_rngs()
    out: dict = {}

    # An uninterrupted run that saves after steps 1..4, synchronously and asynchronously.
    run = Trainer(FSDP, seed=0)
    sync = CheckpointManager(root / "sync", model_config=MODEL, keep_last=2)
    background = CheckpointManager(root / "async", model_config=MODEL, keep_last=2, async_save=True)
    staged = []  # the host copies of the parameter shards after each async save
    for step in range(4):
        run.step(data[step])
        sync.save(run.train["step"], run.states())
        background.save(run.train["step"], run.states())
        cache = background._stager._state_dict_stager._cached_storage_mapping
        shards = [p.to_local().untyped_storage() for p in run.model.parameters()]
        staged.append([id(cache[s]) if s in cache else None for s in shards])
    # Allocated by the first save, reused by the next ones.
    out["staged_reused"] = None not in staged[0] and all(ids == staged[0] for ids in staged)
    saved = run.snapshot()
    saved_draws = draw()
    # Training goes on (in place) while the last async save may still be writing.
    expected_loss = run.step(data[4])
    background.wait()
    out["listing"] = {"sync": listing(root / "sync"), "async": listing(root / "async")}

    # Resume from each: a fresh model of other weights, a fresh optimizer and scheduler.
    out["resumed"] = {}
    for name, manager in (("sync", sync), ("async", background)):
        latest = manager.latest()
        resumed = Trainer(FSDP, seed=1)
        draw()  # move the generators on, so restoring them is visible
        assert manager.load(latest, resumed.states()) == latest
        assert_draws_equal(draw(), saved_draws)  # every rank gets back its own generators
        snapshot = resumed.snapshot()
        loss = resumed.step(data[4])
        out["resumed"][name] = {
            "step_of": manager.step_of(latest),
            "snapshot": snapshot,
            "loss": loss,
        }
    out["saved"], out["expected_loss"] = saved, expected_loss
    background.close()

    # A save cut short: rank 1 fails after rank 0 wrote its shards and model_config.json.
    crashing = _CrashingManager(root / "sync", model_config=MODEL, keep_last=2)
    try:
        crashing.save(5, run.states())
    except dcp.CheckpointException as error:  # every rank gets rank 1's error
        out["crash_error"] = repr(error)
    out["after_crash"] = {
        "listing": listing(root / "sync"),
        "tmp": listing(root / "sync" / ".step-00000005.tmp"),
        "latest": sync.latest().name,
    }
    if dist.get_rank() == 0:
        # As if it had died after DCP's .metadata but before the rename: still not complete.
        shutil.copy(
            root / "sync" / "step-00000004" / ".metadata", root / "sync" / ".step-00000005.tmp"
        )
    dist.barrier()
    out["after_crash"]["latest_with_metadata"] = sync.latest().name
    out["after_crash"]["find_checkpoint"] = find_checkpoint(root / "sync").name
    sync.save(5, run.states())
    out["after_retry"] = listing(root / "sync")
    sync.close()

    # Rank 0 fails to finalize: every rank raises (none waits forever), sync and async.
    errors = []
    for async_save in (False, True):
        failing = _FailingFinalize(
            root / "sync", model_config=MODEL, keep_last=2, async_save=async_save
        )
        try:
            failing.save(6, run.states())
            failing.wait()
            errors.append("no error")
        except (OSError, RuntimeError) as error:
            errors.append(f"{type(error).__name__}: {error}")
        failing.close()
    every_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, errors)
    out["finalize_errors"] = every_rank
    out["after_finalize_error"] = CheckpointManager(root / "sync", model_config=MODEL).latest().name

    # Resharding: the FSDP 4 checkpoint at FSDP 2.
    fsdp2 = Trainer(FSDP, seed=1)
    CheckpointManager(root, model_config=MODEL).load(fsdp4_checkpoint, fsdp2.states())
    out["fsdp2_from_fsdp4"] = fsdp2.snapshot()
    return out


def four_rank_checks(root: Path, single_checkpoint: Path) -> dict:
    data = batches()
    seed_rngs()
    out: dict = {}
    fsdp4 = Trainer(FSDP, seed=0)
    for step in range(2):
        fsdp4.step(data[step])
    manager = CheckpointManager(root, model_config=MODEL)
    out["path"] = manager.save(fsdp4.train["step"], fsdp4.states())
    out["saved"] = fsdp4.snapshot()

    dp2_tp2 = Trainer(DP2_TP2, seed=1)
    manager.load(out["path"], dp2_tp2.states())
    out["dp2_tp2_from_fsdp4"] = dp2_tp2.snapshot()

    # One process saved rng/rank0 only: ranks 1..3 keep their generators and say so.
    messages = capture_logs()
    from_single = Trainer(FSDP, seed=1)
    before = rng_state()
    manager.load(single_checkpoint, from_single.states())
    after = draw()
    set_rng_state(before)
    if dist.get_rank() > 0:
        assert_draws_equal(after, draw())
    out["fsdp4_from_single"] = from_single.snapshot()
    logs: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(logs, messages)
    out["logs"] = logs
    manager.close()
    return out


# Fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def keep_rng():
    """Single-process loads restore the saved generators into the test process."""
    state = rng_state()
    yield
    set_rng_state(state)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    state = rng_state()
    seed_rngs()
    trainer = Trainer(None, seed=2)
    trainer.step(batches()[0])
    manager = CheckpointManager(tmp_path_factory.mktemp("single"), model_config=MODEL)
    path = manager.save(trainer.train["step"], trainer.states())
    set_rng_state(state)
    return {"path": path, "saved": trainer.snapshot()}


@pytest.fixture(scope="module")
def four(tmp_path_factory, single) -> dict:
    return run_distributed(four_rank_checks, 4, tmp_path_factory.mktemp("four"), single["path"])


@pytest.fixture(scope="module")
def two(tmp_path_factory, four) -> dict:
    root = tmp_path_factory.mktemp("two")
    return {"root": root, **run_distributed(two_rank_checks, 2, root, four["path"])}


# Tests ------------------------------------------------------------------------------------
def test_round_trip_restores_training_exactly(two):
    for name in ("sync", "async"):
        resumed = two["resumed"][name]
        assert resumed["step_of"] == 4
        assert_snapshots_equal(resumed["snapshot"], two["saved"])
        assert resumed["snapshot"]["train"] == {"step": 4, "consumed_samples": 4 * GLOBAL_BATCH}
        assert resumed["loss"] == two["expected_loss"], name


def test_keep_last_and_async_save(two):
    # 4 saves with keep_last=2; the async checkpoint equals the one saved synchronously.
    assert two["listing"] == {
        "sync": ["step-00000003", "step-00000004"],
        "async": ["step-00000003", "step-00000004"],
    }
    _, sync_model = load_model_checkpoint(two["root"] / "sync" / "step-00000004")
    _, async_model = load_model_checkpoint(two["root"] / "async")
    assert sync_model.keys() == async_model.keys() == two["saved"]["params"].keys()
    for name, param in two["saved"]["params"].items():
        assert torch.equal(sync_model[name], param) and torch.equal(async_model[name], param)
    # Every async save staged into the host buffers the first one allocated.
    assert two["staged_reused"]


def test_crash_mid_save_leaves_no_checkpoint(two):
    assert "simulated crash while writing" in two["crash_error"]
    after = two["after_crash"]
    assert after["listing"] == [".step-00000005.tmp", "step-00000003", "step-00000004"]
    assert "model_config.json" in after["tmp"] and ".metadata" not in after["tmp"]
    assert after["latest"] == after["latest_with_metadata"] == "step-00000004"
    assert after["find_checkpoint"] == "step-00000004"
    # The retry removed the leftover and kept the newest two.
    assert two["after_retry"] == ["step-00000004", "step-00000005"]


def test_failed_finalize_raises_on_every_rank(two):
    rank0, rank1 = two["finalize_errors"]
    assert all(e.startswith("OSError: simulated") for e in rank0), rank0
    assert all(e.startswith("RuntimeError: checkpoint save failed on rank 0") for e in rank1), rank1
    assert two["after_finalize_error"] == "step-00000005"


def test_reshard_fsdp4_to_dp2_tp2_and_fsdp2(four, two):
    assert_snapshots_equal(four["dp2_tp2_from_fsdp4"], four["saved"])
    assert_snapshots_equal(two["fsdp2_from_fsdp4"], four["saved"])


def test_reshard_fsdp4_to_single_process(four, keep_rng):
    trainer = Trainer(None, seed=1)
    manager = CheckpointManager(four["path"].parent, model_config=MODEL)
    assert manager.latest() == four["path"]
    manager.load(manager.latest(), trainer.states())
    assert_snapshots_equal(trainer.snapshot(), four["saved"])


def test_missing_rank_rng_is_skipped_with_a_log_line(four, single):
    assert_snapshots_equal(four["fsdp4_from_single"], single["saved"])
    assert not any("rng/rank0" in m for m in four["logs"][0])
    for rank in (1, 2, 3):
        assert any(f"no rng/rank{rank}" in m and "keeps its RNG" in m for m in four["logs"][rank])


def test_model_checkpoint_reads_a_training_checkpoint(four):
    cfg, state_dict = load_model_checkpoint(four["path"].parent)
    assert cfg == MODEL
    assert state_dict.keys() == four["saved"]["params"].keys()
    for name, param in four["saved"]["params"].items():
        assert torch.equal(state_dict[name], param), name


def test_other_model_shape_is_refused_before_loading(single, keep_rng):
    wider = MODEL.replace(dim=128, n_heads=8, n_kv_heads=4)
    manager = CheckpointManager(single["path"].parent, model_config=wider)
    with pytest.raises(ValueError, match=r"another shape: dim=64 \(this model: 128\), n_heads="):
        manager.load(single["path"], {})
    deeper = CheckpointManager(single["path"].parent, model_config=MODEL.replace(n_layers=3))
    with pytest.raises(ValueError, match="n_layers=2"):
        deeper.load(single["path"], {})
    # rope and max_seq_len set no parameter shapes: continued long-context training.
    longer = MODEL.replace(max_seq_len=256, rope_theta=500000.0)
    trainer = Trainer(None, seed=1)
    CheckpointManager(single["path"].parent, model_config=longer).load(
        single["path"], trainer.states()
    )
    assert_snapshots_equal(trainer.snapshot(), single["saved"])


def test_incomplete_or_foreign_folders_are_refused(tmp_path, single):
    manager = CheckpointManager(tmp_path / "run", model_config=MODEL)
    assert manager.latest() is None
    (tmp_path / "run").mkdir()
    assert manager.latest() is None
    with pytest.raises(ValueError, match="not a complete llama_dist checkpoint"):
        manager.load(tmp_path / "run", {})
    (tmp_path / "run" / ".step-00000007.tmp").mkdir()
    (tmp_path / "run" / "step-00000008").mkdir()  # no .metadata
    assert manager.latest() is None
    with pytest.raises(ValueError, match="not a complete llama_dist checkpoint"):
        manager.load(tmp_path / "run" / "step-00000008", {})
    with pytest.raises(ValueError, match="not named step-N"):
        manager.step_of(tmp_path / "run")
    with pytest.raises(ValueError, match=r"has no entries \['data_loader'\]"):
        manager.load(single["path"], {"data_loader": {}})
    with pytest.raises(ValueError, match="keep_last=0"):
        CheckpointManager(tmp_path, model_config=MODEL, keep_last=0)


def test_failing_to_delete_an_old_checkpoint_keeps_the_new_one(tmp_path, monkeypatch, keep_rng):
    trainer = Trainer(None, seed=2)
    manager = CheckpointManager(tmp_path, model_config=MODEL, keep_last=1)
    manager.save(1, trainer.states())

    def refuse(path, *args, **kwargs):
        raise OSError("simulated: read-only file system")

    monkeypatch.setattr("llama_dist.checkpoint.manager.shutil.rmtree", refuse)
    messages = capture_logs()
    manager.save(2, trainer.states())  # does not raise
    assert manager.latest().name == "step-00000002"
    assert any("could not delete old checkpoint" in m for m in messages), messages
    monkeypatch.undo()
    manager.save(3, trainer.states())  # the next save retries: only the newest is kept
    assert listing(tmp_path) == ["step-00000003"]
