"""Checkpoints that cannot be read, and saves that find no space (CPU, gloo, real processes).

A damaged checkpoint is found before loading where that is cheap (`damage`: .metadata or a
JSON file that does not parse, a file shorter than .metadata references) and otherwise by the
load itself, which names the file. A save that runs out of space is simulated through the
manager's `_storage_writer` hook: a writer whose files refuse bytes past a budget, as a full
disk does, on one rank; PyTorch's stream writer turns that into "unexpected pos" without the
errno, unless the bytes were a plain write.
"""

from __future__ import annotations

import errno
import io
import json
import shutil
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from test_manager import FSDP, MODEL, Trainer, batches, listing
from torch.distributed.checkpoint.filesystem import FileSystem

import llama_dist.checkpoint.manager as manager_module
from llama_dist.checkpoint import (
    CheckpointManager,
    DamagedCheckpointError,
    DiskFullError,
    damage,
)
from llama_dist.testing.distributed import run_distributed

DiskUsage = namedtuple("DiskUsage", "total used free")


class _Disk:
    """A file system that takes `budget` more bytes from this process, then refuses."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.full = False

    def usage(self, path) -> DiskUsage:
        free = 0 if self.full else 1 << 40
        return DiskUsage(1 << 41, (1 << 41) - free, free)


class _BoundedStream(io.RawIOBase):
    def __init__(self, stream, disk: _Disk) -> None:
        self.stream, self.disk = stream, disk

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.disk.budget:
            self.disk.full = True
            raise OSError(errno.ENOSPC, "No space left on device")
        self.disk.budget -= len(data)
        return self.stream.write(data)

    def tell(self) -> int:
        return self.stream.tell()

    def seek(self, *args) -> int:
        return self.stream.seek(*args)

    def fileno(self) -> int:
        return self.stream.fileno()


class _BoundedFileSystem(FileSystem):
    def __init__(self, disk: _Disk) -> None:
        self.disk = disk

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            yield _BoundedStream(stream, self.disk) if "w" in mode else stream


class _FullDiskManager(CheckpointManager):
    """Writes through `disk` on rank `rank` (others write normally)."""

    def __init__(self, *args, disk: _Disk, rank: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.disk, self.full_rank = disk, rank

    def _storage_writer(self, path: Path) -> dcp.FileSystemWriter:
        writer = dcp.FileSystemWriter(path)
        if dist.get_rank() == self.full_rank:
            writer.fs = _BoundedFileSystem(self.disk)
        return writer


def _try_save(manager: CheckpointManager, step: int, states: dict) -> str:
    try:
        manager.save(step, states)
        manager.wait()
    except DiskFullError as e:
        return f"DiskFullError: {e}"
    return "no error"


def disk_full_checks(root: Path) -> dict:
    trainer = Trainer(FSDP, seed=0)
    trainer.step(batches()[0])
    CheckpointManager(root, model_config=MODEL).save(1, trainer.states())
    out: dict = {}
    real_usage = shutil.disk_usage
    cases = {
        # rank 1's first write is a plain one (its RNG state): the errno reaches DCP
        "errno_rank1": dict(budget=0, rank=1, async_save=False),
        # rank 0 fills the disk inside torch.save: "unexpected pos", no errno
        "short_write_rank0": dict(budget=60_000, rank=0, async_save=False),
        "async_rank1": dict(budget=0, rank=1, async_save=True),
    }
    for step, (name, case) in enumerate(cases.items(), start=2):
        disk = _Disk(case["budget"])
        if dist.get_rank() == case["rank"]:
            manager_module.shutil.disk_usage = disk.usage
        full = _FullDiskManager(
            root, model_config=MODEL, disk=disk, rank=case["rank"], async_save=case["async_save"]
        )
        error = _try_save(full, step, trainer.states())
        full.close()
        manager_module.shutil.disk_usage = real_usage
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        out[name] = {"errors": errors, "listing": listing(root)}

    # Checked before writing: less free space than the previous checkpoint takes.
    manager_module.shutil.disk_usage = lambda path: DiskUsage(1 << 30, (1 << 30) - 10_000, 10_000)
    early = _try_save(CheckpointManager(root, model_config=MODEL), 9, trainer.states())
    manager_module.shutil.disk_usage = real_usage
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, early)
    out["before_writing"] = {"errors": errors, "listing": listing(root)}
    # Space again: the next save works, the previous checkpoint was kept throughout.
    CheckpointManager(root, model_config=MODEL).save(10, trainer.states())
    out["after"] = listing(root)
    return out


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory) -> dict:
    return run_distributed(disk_full_checks, 2, tmp_path_factory.mktemp("full"))


@pytest.mark.parametrize("case", ["errno_rank1", "short_write_rank0", "async_rank1"])
def test_disk_full_save_says_so_removes_the_tmp_folder_and_keeps_the_previous(disk_full, case):
    result = disk_full[case]
    rank0, rank1 = result["errors"]
    assert rank0 == rank1, "every rank raises the same error"
    assert rank0.startswith("DiskFullError: checkpoint save of step ")
    assert "failed: the disk is full (on rank " in rank0
    assert "is on a file system with " in rank0 and " free (after removing the partial " in rank0
    assert "the checkpoint needs about " in rank0 and "(the size of step-00000001)" in rank0
    assert "step-00000001 is intact" in rank0
    rank = case.split("rank")[1]
    cause = "unexpected pos" if case.startswith("short_write") else "[Errno 28] No space left"
    assert f"(on rank {rank}: " in rank0 and cause in rank0
    # No .step-N.tmp left: the space is free at once.
    assert result["listing"] == ["step-00000001"]


def test_short_space_is_refused_before_writing(disk_full):
    rank0, rank1 = disk_full["before_writing"]["errors"]
    assert rank0 == rank1
    assert rank0.startswith("DiskFullError: checkpoint save of step 9 refused before writing")
    assert "with 9.8 KiB free; the checkpoint needs about" in rank0
    assert disk_full["before_writing"]["listing"] == ["step-00000001"]
    assert disk_full["after"] == ["step-00000001", "step-00000010"]


# Damage found before loading -----------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    trainer = Trainer(None, seed=2)
    trainer.step(batches()[0])
    manager = CheckpointManager(tmp_path_factory.mktemp("saved"), model_config=MODEL)
    return manager.save(1, trainer.states())


def copy_of(saved: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(saved, tmp / saved.name))


def test_intact_checkpoint_has_no_damage(saved):
    assert damage(saved) is None


def test_truncated_distcp_is_named_with_its_sizes(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    shard = folder / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    assert damage(folder) == (
        f"__0_0.distcp is truncated: it has {size // 2} bytes, .metadata references {size} "
        "(a copy cut short, or a full disk)"
    )
    shard.unlink()
    assert damage(folder).startswith("__0_0.distcp is missing (.metadata references")


def test_damaged_metadata_and_model_config_are_named(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    metadata = folder / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])
    assert damage(folder).startswith(".metadata cannot be read (")
    assert damage(folder).endswith("): it is damaged or truncated")
    shutil.copy(saved / ".metadata", metadata)
    (folder / "model_config.json").write_text('{"dim": 64,')
    assert damage(folder).startswith("model_config.json is not valid JSON (JSONDecodeError: ")
    manager = CheckpointManager(tmp_path, model_config=MODEL)
    with pytest.raises(DamagedCheckpointError, match=r"step-00000001 \(step 1\) in .* is damaged"):
        manager.load(folder, {})


def test_garbled_contents_fail_the_load_naming_the_file(saved, tmp_path, keep_rng):
    folder = copy_of(saved, tmp_path)
    shard = folder / "__0_0.distcp"
    shard.write_bytes(b"\0" * shard.stat().st_size)  # same size: only a load can tell
    assert damage(folder) is None
    trainer = Trainer(None, seed=1)
    with pytest.raises(DamagedCheckpointError) as failed:
        CheckpointManager(tmp_path, model_config=MODEL).load(folder, trainer.states())
    text = str(failed.value)
    assert "checkpoint step-00000001 (step 1)" in text
    assert "is damaged: reading it failed (rank 0: RuntimeError: __0_0.distcp: " in text


@pytest.fixture
def keep_rng():
    from llama_dist.checkpoint import rng_state, set_rng_state

    state = rng_state()
    yield
    set_rng_state(state)


def test_job_config_is_recorded(tmp_path, keep_rng):
    trainer = Trainer(None, seed=2)
    record = {"data.seq_len": 32, "optim.lr": 0.001}
    path = CheckpointManager(tmp_path, model_config=MODEL, job_config=record).save(
        3, trainer.states()
    )
    assert json.loads((path / "job_config.json").read_text()) == record
    assert damage(path) is None
