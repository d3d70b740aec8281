"""Sharded training checkpoints: DCP step folders that load at any layout or world size.

A training loop hands `CheckpointManager.save` a dict of states: `ModelState`,
`OptimizerState`, anything with `state_dict`/`load_state_dict` (an LR scheduler, a data
loader) and plain values (`{"consumed_samples": 1234}`); `load` fills the same dict in place.
Every rank writes only its own shards, and DCP reshards on load, so a run saved with FSDP on 4
ranks resumes as dp 2 x tp 2, on 2 ranks, or in a single process.

On disk, in `folder`:

    step-00001000/            a complete checkpoint
        .metadata             DCP's index of every entry, written last
        __<rank>_0.distcp     each rank's shards
        model_config.json     the model's shape, checked before anything is loaded
        job_config.json       the resolved job config it was saved under (when the loop
                              gives one), compared with the new one on resume
    .step-00002000.tmp/       a save in progress, or one cut short: never loaded, and
                              removed by the next save (at once when the disk was full)
    step-00003000.incomplete-<time>/
                              a step folder found without .metadata (copied without hidden
                              files, or cut short), set aside on resume and kept
    step-00004000.damaged-<time>/
                              a checkpoint whose files are damaged, set aside on resume with
                              checkpoint.on_damaged=previous and kept

`damage(folder)` finds what can be found without loading (a .metadata or JSON file that does
not parse, a file .metadata references that is missing or shorter than the bytes it
references); what only a load finds (contents that do not decode) `load` raises as the same
`DamagedCheckpointError`, naming the file.

Entries: `model.<parameter name>` (plain names, so `load_model_checkpoint` and the converter
read training checkpoints too), `optimizer.state.<parameter name>.<exp_avg|exp_avg_sq|step>`,
`optimizer.param_groups.<parameter name>.<lr|...>`, the caller's other states under their
keys, and each rank's RNG states under `rng/rank<r>`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import random
import shutil
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import StorageWriter

from llama_dist.checkpoint.model_io import (
    _DCP_METADATA,
    _STEP_DIR,
    MODEL_CONFIG_FILE,
    _single_process,
    find_checkpoint,
    step_checkpoints,
    step_of,
)
from llama_dist.jsonfile import model_config_dict
from llama_dist.models.config import LlamaConfig

logger = logging.getLogger(__name__)

JOB_CONFIG_FILE = "job_config.json"

# Flattened: one entry per parameter name. Parameter groups differ between layouts (they are
# split per device mesh), so only names match a checkpoint to an optimizer of another layout.
_OPTIMIZER_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# Fields that set parameter shapes; rope_theta, rope_scaling and max_seq_len only set buffers
# recomputed from the config, so they may change on resume (continued long-context training).
# output_dim is the head's width (vocab_size for an LM), so an LM checkpoint and a reward model
# of the same backbone differ there and nowhere else.
_SHAPE_FIELDS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "hidden_dim",
    "output_dim",
)


class ModelState(Stateful):
    """The model's parameters as they are sharded, under their plain names; nothing is
    gathered."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    """The optimizer's state, sharded like the parameters and keyed by parameter name."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIMIZER_OPTIONS)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=_OPTIMIZER_OPTIONS)


def rng_state() -> dict[str, Any]:
    """This process's random number generator states: torch (CPU, and CUDA's current device
    when there is one), python `random`, numpy."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned; generators missing from `state` are left as they
    are."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_key(rank: int) -> str:
    # One key per rank: DCP keeps a single copy of entries saved under the same key by several
    # ranks, which would lose every rank's RNG state but one.
    return f"rng/rank{rank}"


def model_shape(cfg: LlamaConfig) -> dict[str, int]:
    """The config fields that determine parameter shapes."""
    return {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "hidden_dim": cfg.hidden_dim,
        "output_dim": cfg.output_width,
    }


def _holds(stored: Mapping[str, Any], key: str) -> bool:
    """Whether a checkpoint's flattened entries include top-level state `key`."""
    return key in stored or any(name.startswith(key + ".") for name in stored)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def _dcp_context() -> Iterator[None]:
    if dist.is_initialized():
        yield
    else:
        with _single_process():
            yield


class DamagedCheckpointError(ValueError):
    """A checkpoint folder with DCP's .metadata whose files cannot be read; `problem` names the
    file and what is wrong with it."""

    def __init__(self, folder: str | os.PathLike, problem: str) -> None:
        self.folder = Path(folder)
        self.problem = problem
        super().__init__(f"{describe(self.folder)} is damaged: {problem}")


class DiskFullError(OSError):
    """A checkpoint save that found no space: its partial folder is removed, the previous
    checkpoint kept."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


def describe(folder: Path) -> str:
    """`checkpoint step-00000010 (step 10) in <folder>`, as errors name a checkpoint."""
    if _STEP_DIR.fullmatch(folder.name):
        return f"checkpoint {folder.name} (step {step_of(folder)}) in {folder.parent}"
    return f"checkpoint {folder}"


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def damage(folder: str | os.PathLike) -> str | None:
    """What makes checkpoint `folder` unreadable as far as is seen without loading it, naming
    the file; None if nothing is.

    Cheap: parses .metadata and the JSON files and stats each file .metadata references,
    which must hold at least the bytes referenced (DCP's storage_data gives each entry's
    offset and length). Contents that do not decode are found only by `load`.
    """
    folder = Path(folder)
    try:
        metadata = dcp.FileSystemReader(folder).read_metadata()
    except Exception as e:  # noqa: BLE001 - unpickling a damaged file raises many types
        return f"{_DCP_METADATA} cannot be read ({_short(e)}): it is damaged or truncated"
    for name in (MODEL_CONFIG_FILE, JOB_CONFIG_FILE):
        path = folder / name
        if not path.is_file():
            # A missing model config is check_checkpoint's to say; older checkpoints have
            # no job config.
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            return f"{name} is not valid JSON ({_short(e)})"
        if name == MODEL_CONFIG_FILE:
            try:
                LlamaConfig.from_dict(data)
            except (ValueError, TypeError, AttributeError) as e:
                return f"{name} does not describe a model ({_short(e)})"
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing ({_DCP_METADATA} references {end} bytes of it)"
        size = path.stat().st_size
        if size < end:
            return (
                f"{name} is truncated: it has {size} bytes, {_DCP_METADATA} references {end} "
                "(a copy cut short, or a full disk)"
            )
    return None


class _NamingFileSystem(FileSystem):
    """Remembers the file opened last, so that a failed read can name it (DCP's errors do
    not)."""

    opened: str | None = None

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        self.opened = Path(path).name
        with super().create_stream(path, mode) as stream:
            yield stream


class _NamingReader(dcp.FileSystemReader):
    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.fs = _NamingFileSystem()

    def read_data(self, plan: Any, planner: Any) -> Future:
        try:
            return super().read_data(plan, planner)
        except Exception as e:
            raise RuntimeError(f"{self.fs.opened}: {_short(e)}") from e


def load_alone(request: dict[str, Any], folder: Path) -> None:
    """Fill `request` from the checkpoint in `folder` in this process alone (no collectives,
    e.g. a few small entries read before the real load); a failed read is a
    DamagedCheckpointError naming the file."""
    try:
        with warnings.catch_warnings():
            # DCP warns whenever it runs without collectives, as asked to here.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(request, storage_reader=_NamingReader(folder), no_dist=True)
    except CheckpointException as e:
        detail = "; ".join(f"rank {rank}: {_short(f)}" for rank, f in _failures(e))
        raise DamagedCheckpointError(folder, f"reading it failed ({detail})") from e


def _failures(error: BaseException) -> list[tuple[int, BaseException]]:
    """(rank, exception) of each rank a DCP collective failed on; rank 0's for another
    error."""
    if isinstance(error, CheckpointException):
        return [
            (rank, failure[0] if isinstance(failure, tuple) else failure)
            for rank, failure in sorted(error.failures.items())
        ]
    return [(_rank(), error)]


# PyTorch's stream writer turns a short write into "enforce fail ... unexpected pos N vs M",
# without the errno: a full disk is then told by the space left.
_SHORT_WRITE = ("unexpected pos", "file write failed")


def _space_failure(error: BaseException) -> tuple[str, bool] | None:
    """(which rank failed and how; whether the errno says no space) if `error` is a failed
    write that a full disk explains, else None."""
    short_write = None
    for rank, failure in _failures(error):
        cause: BaseException | None = failure
        while cause is not None:
            if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
                return f"on rank {rank}: {_short(cause)}", True
            if "No space left on device" in str(cause):
                return f"on rank {rank}: {_short(cause)}", True
            if short_write is None and any(t in str(cause) for t in _SHORT_WRITE):
                short_write = f"on rank {rank}: {_short(cause)}"
            cause = cause.__cause__ or cause.__context__
    return None if short_write is None else (short_write, False)


def _folder_bytes(folder: Path) -> int:
    """The space the files of `folder` take (allocated blocks, so compression counts)."""
    return sum(p.stat().st_blocks * 512 for p in folder.iterdir() if p.is_file())


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a state (DTensors at their global size, as saved once)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Stateful):
        return _tensor_bytes(value.state_dict())
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


@dataclass
class _PendingSave:
    """An async save whose data is still being written."""

    future: Future
    tmp: Path
    final: Path
    started: float
    states: Mapping[str, Any]  # for the size estimate if the write fails
    # Set once rank 0 has renamed the folder and applied retention (at once on other ranks).
    finalized: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class CheckpointManager:
    """Training checkpoints in `folder/step-NNNNNNNN`, written atomically by all ranks.

    Every rank constructs the manager and calls `save`, `load`, `wait` and `close` together;
    rank 0 alone renames, deletes and writes `model_config.json`.

    keep_last: after each completed save, delete all but the newest `keep_last` complete
        checkpoints (None keeps all).
    async_save: `save` returns once the states are copied to CPU memory; the files are written
        in a background thread while training goes on, and the checkpoint appears under its
        final name when they are complete (at the latest by the next `save`, `wait` or
        `close`).
    save_rng: also save each rank's RNG states (`rng_state`) and restore them on load.
    job_config: the resolved job config (JSON-able), written by rank 0 as job_config.json into
        every checkpoint (`train.resume_check` compares it on resume); `resume_latest` sets it.

    A save that finds no space (before it starts: less free space than the previous
    checkpoint takes; or a write failing with ENOSPC on any rank) raises `DiskFullError` on
    every rank, saying where, how much is free and how much the checkpoint needs; its
    partial `.step-N.tmp` folder is removed at once, the previous checkpoint kept.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        model_config: LlamaConfig,
        keep_last: int | None = None,
        async_save: bool = False,
        save_rng: bool = True,
        job_config: Mapping[str, Any] | None = None,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(
                f"checkpoint keep_last={keep_last} would delete the checkpoint just saved; "
                "use keep_last >= 1, or None to keep every checkpoint"
            )
        self.folder = Path(folder)
        self.model_config = model_config
        self.keep_last = keep_last
        self.async_save = async_save
        self.save_rng = save_rng
        self.job_config = job_config
        self._pending: _PendingSave | None = None
        self._closed = False
        # The background thread of an async save runs DCP's collectives while the training loop
        # runs its own. On one process group the two streams interleave differently on each
        # rank and deadlock (gloo does), so async saves get a group of their own. It is a
        # gloo group because `dcp.async_save` requires one that handles CPU tensors, which an
        # NCCL default group does not.
        self._group: dist.ProcessGroup | None = None
        if async_save and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        # One stager for every async save: the host copies of the states are allocated by the
        # first save (pinned on CUDA, so the device-to-host copy runs at full speed) and
        # reused by the next ones, which only copy into them. Staging is synchronous: the
        # training stalls for the copy, not for the write, and never changes a tensor while
        # it is being copied.
        self._stager: DefaultStager | None = None
        if async_save:
            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=cuda,
                    use_shared_memory=False,
                    use_async_staging=False,
                    use_non_blocking_copy=cuda,
                )
            )

    # Saving -------------------------------------------------------------------------------
    def save(self, step: int, states: Mapping[str, Any]) -> Path:
        """Write `states` as the checkpoint of `step`; returns its final folder.

        `states` maps names to `Stateful` objects (their `state_dict()` is saved) or plain
        values (tensors, numbers, nested dicts). Plain values must be the same on every rank,
        except tensors DCP can shard (DTensors). With async_save the folder exists once the
        background write has finished (`wait()` makes sure).
        """
        if self._closed:
            raise ValueError("this CheckpointManager is closed; create a new one to save again")
        if step < 0:
            raise ValueError(f"checkpoint step={step} must be >= 0: pass the optimizer steps taken")
        self.wait()
        final = self.folder / f"step-{step:08d}"
        tmp = self.folder / f".{final.name}.tmp"
        if final.exists():
            raise ValueError(
                f"{final} already exists; resume from it, or delete it to save step {step} again"
            )
        request = dict(states)
        if self.save_rng:
            request[rng_key(_rank())] = rng_state()

        error = None
        if _rank() == 0:
            try:
                self._prepare(tmp, step, states)
            except BaseException as e:  # noqa: BLE001 - raised on every rank just below
                error = e
        # No rank may write into `tmp` while rank 0 may still be removing a leftover of it,
        # nor at all if rank 0 could not create it.
        self._raise_together(error, during="while preparing the folder")

        started = time.perf_counter()
        writer = self._storage_writer(tmp)
        if not self.async_save:
            try:
                with _dcp_context():
                    # DCP gathers every rank's write results before rank 0 writes .metadata,
                    # so when this returns all data is on disk; a failure reaches every rank.
                    dcp.save(request, storage_writer=writer)
            except CheckpointException as e:
                self._save_failed(e, tmp, step, states)
            if _rank() == 0:
                try:
                    self._finalize(tmp, final, started)
                except BaseException as e:  # noqa: BLE001 - raised on every rank just below
                    error = e
            # Every rank sees the final folder once save returns, or every rank raises.
            self._raise_together(error)
            return final

        response = dcp.async_save(
            request, storage_writer=writer, process_group=self._group, async_stager=self._stager
        )
        # An AsyncSaveResponse when staging is asynchronous too, else the upload future.
        future = getattr(response, "upload_completion", response)
        pending = _PendingSave(future=future, tmp=tmp, final=final, started=started, states=states)
        self._pending = pending
        if _rank() == 0:
            future.add_done_callback(lambda f: self._finalize_async(pending, f))
        else:
            pending.finalized.set()
        return final

    def wait(self) -> None:
        """Block until an async save in flight is written and in place; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            # DCP reports a failed write to every rank, so all ranks raise here together.
            pending.future.result()
        except CheckpointException as error:
            pending.finalized.wait()
            self._save_failed(error, pending.tmp, step_of(pending.final), pending.states)
        pending.finalized.wait()
        # Only rank 0 finalizes: its outcome decides for all.
        self._raise_together(pending.error if _rank() == 0 else None)

    def close(self) -> None:
        """Finish an async save in flight and release the manager's process group."""
        if self._closed:
            return
        self.wait()
        self._closed = True
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _storage_writer(self, path: Path) -> StorageWriter:
        return dcp.FileSystemWriter(path)

    def _prepare(self, tmp: Path, step: int, states: Mapping[str, Any]) -> None:
        """Rank 0: remove leftovers, check the space, create `tmp` with the JSON files."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        previous = self.latest()
        if previous is not None:
            needed = _folder_bytes(previous)
            free = shutil.disk_usage(self.folder).free
            if free < needed:
                raise DiskFullError(
                    f"checkpoint save of step {step} refused before writing: the disk is full. "
                    f"{self.folder} is on a file system with {_size(free)} free; the checkpoint "
                    f"needs about {_size(needed)} (the size of {previous.name}). "
                    f"{self._space_fix(previous)}"
                )
        tmp.mkdir()
        files = {MODEL_CONFIG_FILE: self.model_config.to_dict()}
        if self.job_config is not None:
            files[JOB_CONFIG_FILE] = dict(self.job_config)
        try:
            for name, data in files.items():
                (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
        except OSError as e:
            failure = _space_failure(e)
            if failure is None:
                raise
            raise DiskFullError(self._disk_full_message(step, failure[0], tmp, states)) from e

    def _save_failed(
        self, error: CheckpointException, tmp: Path, step: int, states: Mapping[str, Any]
    ) -> NoReturn:
        """Every rank, once DCP has reported a failed write to all: a full disk is said as
        such and its partial folder removed at once; any other failure is re-raised as it is
        (the folder is kept for a look, and removed by the next save)."""
        message = [None]
        if _rank() == 0:
            failure = _space_failure(error)
            if failure is not None:
                what, certain = failure
                if certain or shutil.disk_usage(self.folder).free < self._needed(states)[0]:
                    message[0] = self._disk_full_message(step, what, tmp, states)
        if dist.is_initialized() and dist.get_world_size(self._group) > 1:
            dist.broadcast_object_list(message, src=0, group=self._group)
        if message[0] is not None:
            raise DiskFullError(message[0]) from error
        raise error

    def _needed(self, states: Mapping[str, Any]) -> tuple[int, str]:
        """Rank 0: about how many bytes a checkpoint takes, and whence the estimate."""
        previous = self.latest()
        if previous is not None:
            return _folder_bytes(previous), f"the size of {previous.name}"
        return _tensor_bytes(states), "the size of its tensors"

    def _disk_full_message(self, step: int, what: str, tmp: Path, states: Mapping[str, Any]) -> str:
        """Rank 0: remove the partial folder `tmp`, and say what happened."""
        shutil.rmtree(tmp, ignore_errors=True)
        needed, source = self._needed(states)
        free = shutil.disk_usage(self.folder).free
        return (
            f"checkpoint save of step {step} failed: the disk is full ({what}). {self.folder} "
            f"is on a file system with {_size(free)} free (after removing the partial "
            f"{tmp.name}); the checkpoint needs about {_size(needed)} ({source}). "
            f"{self._space_fix(self.latest())}"
        )

    def _space_fix(self, previous: Path | None) -> str:
        kept = (
            f"{previous.name} is intact: free space (or point checkpoint.folder at a larger "
            "disk), then run the same command again to resume from it"
            if previous is not None
            else "No earlier checkpoint exists: free space (or point checkpoint.folder at a "
            "larger disk) and run again"
        )
        if self.keep_last is not None and self.keep_last > 1:
            kept += (
                f"; checkpoint.keep_last={self.keep_last} keeps that many besides the one "
                "being written (a lower value needs less space)"
            )
        return kept

    def _finalize_async(self, pending: _PendingSave, future: Future) -> None:
        try:
            if future.exception() is None:
                self._finalize(pending.tmp, pending.final, pending.started)
        except BaseException as error:  # noqa: BLE001 - re-raised by wait() on the main thread
            pending.error = error
        finally:
            pending.finalized.set()

    def _finalize(self, tmp: Path, final: Path, started: float) -> None:
        """Rank 0, once every rank's data and .metadata are written."""
        tmp.rename(final)
        logger.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - started)
        if self.keep_last is None:
            return
        for _, old in step_checkpoints(self.folder)[: -self.keep_last]:
            trash = old.with_name(f".{old.name}.trash")
            try:
                # Renamed first: a removal cut short leaves a hidden folder, not a broken one.
                old.rename(trash)
                shutil.rmtree(trash)
            except OSError as error:
                # The new checkpoint is complete; failing to delete an old one loses nothing.
                logger.warning(
                    "could not delete old checkpoint %s (%s); %s is complete. Free the space by "
                    "hand; the next save retries",
                    old,
                    error,
                    final,
                )
                continue
            logger.info("deleted checkpoint %s (keep_last=%d)", old, self.keep_last)

    def _remove_leftovers(self) -> None:
        """Rank 0: remove saves and deletions cut short. None is in flight: the previous save
        was waited for."""
        for child in self.folder.iterdir():
            if child.name.startswith(".step-") and child.name.endswith((".tmp", ".trash")):
                logger.info("removing %s, left by an interrupted save or deletion", child)
                shutil.rmtree(child)

    def _raise_together(
        self, error: BaseException | None, *, during: str = "while moving it into place"
    ) -> None:
        """Share rank 0's outcome: every rank raises, or none does (and all wait for rank 0,
        like a barrier). A full disk is a DiskFullError with the same message everywhere."""
        message = [None if error is None else (type(error).__name__, str(error))]
        if dist.is_initialized() and dist.get_world_size(self._group) > 1:
            dist.broadcast_object_list(message, src=0, group=self._group)
        if error is not None:
            raise error
        if message[0] is not None:
            kind, text = message[0]
            if kind == DiskFullError.__name__:
                raise DiskFullError(text)
            raise RuntimeError(
                f"checkpoint save failed on rank 0 {during} ({kind}: {text}); "
                "no checkpoint of this step exists, the previous one is intact"
            )

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self._group)

    # Finding and loading ------------------------------------------------------------------
    def set_aside_incomplete(self) -> list[Path]:
        """Rank 0: rename every `step-N` folder without DCP's .metadata (what `cp -r
        step-N/* dest/` leaves, since it skips hidden files, or a copy cut short) to
        `step-N.incomplete-<time>`, saying so; returns the new names. Such a folder is never
        loaded, and left in place it would make the save of step N fail. Nothing is
        deleted: it may hold the only copy of something."""
        if not self.folder.is_dir():
            return []
        steps = step_checkpoints(self.folder)
        complete = {path for _, path in steps}
        newest = f"the newest complete one is {steps[-1][1].name}" if steps else "none is complete"
        stamp = time.strftime("%Y%m%dT%H%M%S")
        moved = []
        for child in sorted(self.folder.iterdir()):
            if child in complete or not child.is_dir() or not _STEP_DIR.fullmatch(child.name):
                continue
            target = child.with_name(f"{child.name}.incomplete-{stamp}")
            child.rename(target)
            logger.warning(
                "%s is not a complete checkpoint (it has no %s, which DCP writes last: a copy "
                "that skipped hidden files, or one cut short); set aside as %s, not deleted; %s",
                child,
                _DCP_METADATA,
                target.name,
                newest,
            )
            moved.append(target)
        return moved

    def set_aside_damaged(self, path: Path, problem: str) -> Path:
        """Rank 0: rename damaged checkpoint `path` to `step-N.damaged-<time>`, saying so;
        returns the new name. Nothing is deleted: it may be repairable."""
        target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        path.rename(target)
        logger.warning(
            "%s is damaged: %s; set aside as %s, not deleted", describe(path), problem, target.name
        )
        return target

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, or None."""
        if not self.folder.is_dir():
            return None
        steps = step_checkpoints(self.folder)
        return steps[-1][1] if steps else None

    @staticmethod
    def step_of(path: str | os.PathLike) -> int:
        """The step of a checkpoint folder, from its `step-N` name."""
        return step_of(path)

    def load(self, path: str | os.PathLike, states: MutableMapping[str, Any]) -> Path:
        """Load a checkpoint into `states` in place; returns the folder read.

        `path` is a checkpoint folder, or a folder of them (its highest complete step is read).
        `Stateful` values get `load_state_dict`; plain values are replaced in `states` (and
        nested dicts filled in place). Only the entries named in `states` are read, so a
        model-only checkpoint initializes a model through `{"model": ModelState(model)}`.
        Raises ValueError, before reading any tensor, if the folder is not a complete
        checkpoint, was saved for another model shape, or lacks one of the entries; and
        `DamagedCheckpointError` (a ValueError), naming the file, if reading it fails.
        """
        self.wait()
        folder = check_checkpoint(path, self.model_config)
        stored = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        missing = [key for key in states if not _holds(stored, key)]
        if missing:
            present = sorted({name.split(".")[0] for name in stored})
            raise ValueError(
                f"{folder} has no entries {missing} (it holds {present}); load only the states "
                "it holds, e.g. {'model': ModelState(model)} from a model-only checkpoint"
            )

        request = dict(states)
        key = rng_key(_rank())
        if self.save_rng:
            if _holds(stored, key):
                # Only the generators the saving process had (CUDA's may be absent).
                request[key] = {
                    name: value for name, value in rng_state().items() if f"{key}.{name}" in stored
                }
            else:
                logger.info(
                    "%s has no %s (saved by fewer ranks, or without RNG states); "
                    "rank %d keeps its RNG state",
                    folder,
                    key,
                    _rank(),
                )
        started = time.perf_counter()
        try:
            with _dcp_context():
                dcp.load(request, storage_reader=_NamingReader(folder))
        except CheckpointException as e:  # on every rank: DCP gathers the read failures
            detail = "; ".join(f"rank {rank}: {_short(f)}" for rank, f in _failures(e))
            raise DamagedCheckpointError(folder, f"reading it failed ({detail})") from e
        for name, value in states.items():
            if not isinstance(value, Stateful):
                states[name] = request[name]
        if key in request:
            set_rng_state(request[key])
        if _rank() == 0:
            logger.info("loaded checkpoint %s in %.1f s", folder, time.perf_counter() - started)
        return folder


def check_checkpoint(path: str | os.PathLike, model_config: LlamaConfig) -> Path:
    """The complete checkpoint folder `path` names, if it holds a model of this shape.

    Rotary settings and max_seq_len may differ: they are not parameters. Reads only
    `model_config.json`, so jobs call it before any heavy work.
    """
    folder = find_checkpoint(path)
    config_path = folder / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"{folder} is not a complete llama_dist checkpoint: it has no "
            f"{MODEL_CONFIG_FILE}; point at a checkpoint written by llama_dist"
        )
    try:
        saved_config = LlamaConfig.from_dict(model_config_dict(config_path), source=config_path)
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise DamagedCheckpointError(
            folder, f"{MODEL_CONFIG_FILE} is not a valid model config ({_short(e)})"
        ) from e
    saved = model_shape(saved_config)
    current = model_shape(model_config)
    differing = [name for name in _SHAPE_FIELDS if saved[name] != current[name]]
    if differing:
        details = ", ".join(
            f"{name}={saved[name]} (this model: {current[name]})" for name in differing
        )
        hint = ""
        if differing == ["output_dim"]:
            hint = (
                " (only the heads differ: to start a reward model from a language model, load "
                "the backbone with llama_dist.models.reward.backbone_state_dict instead)"
            )
        raise ValueError(
            f"{folder} holds a model of another shape: {details}; set the model config to "
            f"the checkpoint's shape, or load a checkpoint of this model{hint}"
        )
    return folder
