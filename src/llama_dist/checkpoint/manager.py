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
    .step-00002000.tmp/       a save in progress, or one cut short: never loaded, and
                              removed by the next save
    step-00003000.incomplete-<time>/
                              a step folder found without .metadata (copied without hidden
                              files, or cut short), set aside on resume and kept

Entries: `model.<parameter name>` (plain names, so `load_model_checkpoint` and the converter
read training checkpoints too), `optimizer.state.<parameter name>.<exp_avg|exp_avg_sq|step>`,
`optimizer.param_groups.<parameter name>.<lr|...>`, the caller's other states under their
keys, and each rank's RNG states under `rng/rank<r>`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
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
from llama_dist.models.config import LlamaConfig

logger = logging.getLogger(__name__)

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


@dataclass
class _PendingSave:
    """An async save whose data is still being written."""

    future: Future
    tmp: Path
    final: Path
    started: float
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
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        model_config: LlamaConfig,
        keep_last: int | None = None,
        async_save: bool = False,
        save_rng: bool = True,
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

        if _rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            tmp.mkdir()
            config = json.dumps(self.model_config.to_dict(), indent=2) + "\n"
            (tmp / MODEL_CONFIG_FILE).write_text(config)
        # No rank may write into `tmp` while rank 0 may still be removing a leftover of it.
        self._barrier()

        started = time.perf_counter()
        writer = self._storage_writer(tmp)
        if not self.async_save:
            with _dcp_context():
                # DCP gathers every rank's write results before rank 0 writes .metadata, so
                # when this returns all data is on disk.
                dcp.save(request, storage_writer=writer)
            error = None
            if _rank() == 0:
                try:
                    self._finalize(tmp, final, started)
                except BaseException as e:  # noqa: BLE001 - raised on every rank just below
                    error = e
            # Every rank sees the final folder once save returns, or every rank raises.
            self._raise_together(error)
            return final

        response = dcp.async_save(request, storage_writer=writer, process_group=self._group)
        # An AsyncSaveResponse when staging is asynchronous too, else the upload future.
        future = getattr(response, "upload_completion", response)
        pending = _PendingSave(future=future, tmp=tmp, final=final, started=started)
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
        # DCP reports a failed write to every rank, so all ranks raise here together.
        pending.future.result()
        pending.finalized.wait()
        # Only rank 0 finalizes: its outcome decides for all.
        self._raise_together(pending.error if _rank() == 0 else None)

    def close(self) -> None:
        """Finish an async save in flight and release the manager's process group."""
        if self._closed:
            return
        self.wait()
        self._closed = True
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _storage_writer(self, path: Path) -> StorageWriter:
        return dcp.FileSystemWriter(path)

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

    def _raise_together(self, error: BaseException | None) -> None:
        """Share rank 0's finalize outcome: every rank raises, or none does (and all wait for
        rank 0, like a barrier)."""
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        if dist.is_initialized() and dist.get_world_size(self._group) > 1:
            dist.broadcast_object_list(message, src=0, group=self._group)
        if error is not None:
            raise error
        if message[0] is not None:
            raise RuntimeError(
                f"checkpoint save failed on rank 0 while moving it into place ({message[0]}); "
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
        checkpoint, was saved for another model shape, or lacks one of the entries.
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
        with _dcp_context():
            dcp.load(request, checkpoint_id=folder)
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
    saved = model_shape(LlamaConfig.from_dict(json.loads(config_path.read_text())))
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
