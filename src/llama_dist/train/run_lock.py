"""One run per run folder: `<run folder>/run.lock`, held by rank 0 while the run lives.

The lock file is JSON naming its owner (host, pid, start time, command). It appears whole and
at once: the owner writes it under a private name and hard-links it into place, which fails if
a lock is there already (atomic on local file systems, NFS and Lustre). The owner touches it
every `HEARTBEAT_S` seconds from a background thread and removes it when the run ends.

A run that finds a lock takes it over only if the owner is dead:

- the lock was left by an earlier attempt of the same job (same Slurm job id or torchrun
  run id, lower restart count): a restarted or requeued job takes its own lock back at once,
  whichever node its new rank 0 is on;
- the owner ran on this machine (same host name, boot and pid namespace) and its process is
  gone (or is another process that reused the pid);
- the owner ran elsewhere and its heartbeat is older than `STALE_S` (clocks of the hosts
  within seconds of each other, as NTP keeps them).

Otherwise the run is refused, the owner named. Taking over renames the dead lock to a private
name, checks that it is still the one judged dead (a racing run may have replaced it: then it
is put back) and links the new lock in, so two runs can never both believe they own a folder.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0  # how often the owner touches the lock
STALE_S = 60.0  # a lock from another host whose heartbeat is this old is taken over
_TAKEOVER_TRIES = 3


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _machine() -> str:
    """Where pids mean the same thing: host name, kernel boot and pid namespace."""
    boot = _read_text("/proc/sys/kernel/random/boot_id") or "?"
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}/{boot}/{namespace}"


def _process_start(pid: int) -> str | None:
    """The process's start time since boot (clock ticks), to tell a reused pid apart; None
    where /proc does not say."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) may hold spaces; the fields after its ")" are plain.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is not None and stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
        return False  # exited, not yet reaped by its parent
    return start is None or _process_start(pid) in (None, start)


def _job() -> tuple[str | None, tuple[int, int]]:
    """(this job's id across restarts, its attempt): the Slurm job (requeues count) or the
    torchrun launch (restarts count)."""
    attempt = (
        int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    )
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}", attempt
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{os.environ['TORCHELASTIC_RUN_ID']}", attempt
    return None, attempt


@dataclass(frozen=True)
class Owner:
    """Who holds a run folder."""

    host: str
    pid: int
    started: float  # time.time() when the lock was taken
    command: str
    token: str  # unique to this holder
    machine: str  # see _machine
    process_start: str | None
    job: str | None
    attempt: tuple[int, int]

    @classmethod
    def current(cls) -> Owner:
        job, attempt = _job()
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=time.time(),
            command=shlex.join(sys.argv),
            token=uuid.uuid4().hex,
            machine=_machine(),
            process_start=_process_start(os.getpid()),
            job=job,
            attempt=attempt,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Owner | None:
        try:
            data = json.loads(text)
            data["attempt"] = tuple(data["attempt"])
            return cls(**data)
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host}, started {started} ({self.command})"


def dead_because(owner: Owner | None, age_s: float, me: Owner) -> str | None:
    """Why the holder of a lock whose heartbeat is `age_s` old is dead, or None if it may be
    alive. `owner` None: a lock file that cannot be read (not written by llama_dist)."""
    if owner is None:
        return f"unreadable and untouched for {age_s:.0f} s" if age_s > STALE_S else None
    if owner.job is not None and owner.job == me.job and owner.attempt < me.attempt:
        return f"it was left by an earlier attempt of this job ({owner.job})"
    if owner.machine == me.machine:
        if _process_alive(owner.pid, owner.process_start):
            return None
        return f"its process (pid {owner.pid} on this host) is gone"
    if age_s > STALE_S:
        return f"its heartbeat stopped {age_s:.0f} s ago (taken over after {STALE_S:.0f} s)"
    return None


def _refusal(run_dir: Path, path: Path, owner: Owner | None, age_s: float, me: Owner) -> str:
    if owner is None:
        return (
            f"{run_dir} is locked by {path}, which is not a llama_dist lock; if no run uses "
            "this folder, delete that file"
        )
    text = (
        f"{run_dir} is in use by another run: {owner.describe()}; its lock {path} was "
        f"refreshed {age_s:.0f} s ago. Wait for that run to end, stop it, or use another run "
        "folder (hydra.run.dir=... or run_name=...)"
    )
    if owner.machine != me.machine:
        text += (
            f". If it is dead, its lock is taken over once its heartbeat is {STALE_S:.0f} s "
            f"old (in about {max(STALE_S - age_s, 0):.0f} s), or delete {path}"
        )
    return text


class RunLock:
    """The lock of one run folder, held by this process (see the module docstring)."""

    def __init__(self, path: Path, owner: Owner) -> None:
        self.path = path
        self.owner = owner
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._beat.start()

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> RunLock:
        """Take `run_dir`'s lock; ValueError naming the owner if a live run holds it."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        me = Owner.current()
        mine = path.with_name(f".{LOCK_FILE}.{me.token}")
        mine.write_text(me.to_json())
        try:
            for _ in range(_TAKEOVER_TRIES):
                try:
                    os.link(mine, path)
                    return cls(path, me)
                except FileExistsError:
                    pass
                try:
                    text, age_s = path.read_text(), time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile
                owner = Owner.from_json(text)
                why = dead_because(owner, age_s, me)
                if why is None:
                    raise ValueError(_refusal(run_dir, path, owner, age_s, me))
                _break(path, text, me, why)
            raise ValueError(
                f"could not take {path}: other runs keep taking it; start one run per folder"
            )
        finally:
            mine.unlink(missing_ok=True)

    def holds(self) -> bool:
        """Whether the lock file is still this holder's."""
        try:
            owner = Owner.from_json(self.path.read_text())
        except OSError:
            return False
        return owner is not None and owner.token == self.owner.token

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours."""
        self._stop.set()
        if os.getpid() != self.owner.pid:
            return  # a forked child: the lock is its parent's
        if self.holds():
            self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self.holds():
                log.error(
                    "%s is no longer this run's lock (removed, or taken over by another run "
                    "that judged this one dead); two runs may now write into %s",
                    self.path,
                    self.path.parent,
                )
                return
            try:
                os.utime(self.path)
            except OSError as error:  # a file server hiccup: the next beat retries
                log.warning("could not refresh %s (%s)", self.path, error)


def _break(path: Path, text: str, me: Owner, why: str) -> None:
    """Remove the dead lock `path` whose content was `text`, unless another run replaced it
    since it was read."""
    moved = path.with_name(f".{LOCK_FILE}.dead-{me.token}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return  # another run broke it first
    try:
        if moved.read_text() == text:
            log.warning("taking over %s: %s", path, why)
            return
        # A racing run took the folder between our read and the rename: give its lock back.
        try:
            os.link(moved, path)
        except FileExistsError:
            log.error("%s: could not put back the lock of %s", path, moved.read_text())
    finally:
        moved.unlink(missing_ok=True)


_held: dict[Path, RunLock] = {}
_exit_hook = False


def hold_run_folder(run_dir: str | os.PathLike) -> RunLock:
    """This process's lock of `run_dir`, taken now unless it holds it already (a loop run
    twice in one process, as tests do); released by `release_run_folders` or at exit."""
    global _exit_hook
    key = Path(run_dir).resolve()
    lock = _held.get(key)
    if lock is None or not lock.holds():
        if not _exit_hook:
            _exit_hook = True
            atexit.register(release_run_folders)
        lock = _held[key] = RunLock.acquire(key)
    return lock


def release_run_folders() -> None:
    """Release every run folder this process holds."""
    while _held:
        _, lock = _held.popitem()
        lock.release()


__all__ = [
    "HEARTBEAT_S",
    "LOCK_FILE",
    "STALE_S",
    "Owner",
    "RunLock",
    "dead_because",
    "hold_run_folder",
    "release_run_folders",
]
