"""A catalogue of faults and what survives them (issue 12): concurrent runs in one folder,
incomplete step folders, unknown config keys, Ctrl-C and other signals, exit codes, stalled
ranks, file permissions of exports. The costly cases run the real entry points under
torchrun, several checks per launch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from pretrain_helpers import ROOT, job, run, train_losses, write_corpus

from llama_dist.config import register_configs, to_job_config
from llama_dist.config_keys import to_typed_config
from llama_dist.models.config import LlamaConfig
from llama_dist.models.hf_adapter import save_hf_folder
from llama_dist.models.llama import Llama
from llama_dist.testing.distributed import run_distributed
from llama_dist.train import run_lock
from llama_dist.train.common import run_job
from llama_dist.train.run_lock import LOCK_FILE, Owner, RunLock

# torchrun with the trainers' exit codes passed on (plain torchrun turns every failure into 1)
LAUNCH = [sys.executable, "-m", "llama_dist.torchrun", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


# Unknown config keys --------------------------------------------------------------------------
def composed(name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.parametrize(
    ("config", "override", "nearest"),
    [
        ("pretrain", "+optim.learning_rate=1e-5", "optim.lr"),
        ("pretrain", "+paralel=tp", "parallel"),
        ("pretrain", "+train.step=5", "train.steps"),
        ("sft", "+data.seq_length=64", "data.seq_len"),
        ("reward", "+loss.margins=small", "loss.margin"),
        # sources is a dict of the user's names; keys inside a source are still checked
        ("reward_safety", "+data.sources.safety.ratoi=0.5", "data.sources.safety.ratio"),
    ],
)
def test_unknown_keys_are_errors_naming_the_nearest_key(config, override, nearest):
    key = override[1:].split("=")[0]
    message = f"{key} is not a config key; did you mean {nearest}?"
    with pytest.raises(ValueError, match=re.escape(message)):
        to_typed_config(composed(config, override))


def test_keys_of_free_dicts_and_valid_additions_pass():
    typed = to_typed_config(composed("reward_safety", "+loss.custom_margins.better=0.5"))
    assert typed.loss.custom_margins == {"better": 0.5}
    assert typed.data.sources["safety"].ratio == 0.9
    assert to_job_config(composed("pretrain", "train.steps=7")).train.steps == 7


def test_unknown_key_fails_the_entry_point_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    args = ["+optim.learning_rate=1e-5", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(
        [sys.executable, "launch/pretrain.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "pretrain: error: optim.learning_rate is not a config key; did you mean optim.lr?" in (
        out.stderr
    )
    assert "Traceback" not in out.stderr
    assert not (run_dir / "config.yaml").exists()


# The run-folder lock ---------------------------------------------------------------------------
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def fake_lock(run_dir: Path, *, age_s: float = 0.0, **fields) -> Path:
    """A lock as another run would have left it: this machine's unless `machine` is given."""
    owner = Owner.current()
    data = {**json.loads(owner.to_json()), "token": "someone-else", **fields}
    path = run_dir / LOCK_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_lock_refuses_a_live_owner_and_names_it(tmp_path):
    first = RunLock.acquire(tmp_path)
    try:
        with pytest.raises(ValueError) as refused:
            RunLock.acquire(tmp_path)
        text = str(refused.value)
        assert f"{tmp_path} is in use by another run: pid {os.getpid()} on host" in text
        assert time.strftime("started %Y-%m-%d") in text
        assert first.holds()
    finally:
        first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no private files left
    RunLock.acquire(tmp_path).release()  # free again


def test_lock_of_a_dead_process_on_this_machine_is_taken_over(tmp_path, caplog):
    fake_lock(tmp_path, pid=dead_pid())
    lock = RunLock.acquire(tmp_path)
    assert lock.holds() and "is gone" in caplog.text
    lock.release()
    # A live pid whose process started at another time is a reused pid: dead too.
    fake_lock(tmp_path, pid=os.getpid(), process_start="1")
    RunLock.acquire(tmp_path).release()


def test_lock_from_another_host_is_taken_over_once_its_heartbeat_is_stale(tmp_path):
    fake_lock(tmp_path, machine="node7/boot/ns", host="node7", age_s=5)
    with pytest.raises(ValueError, match="pid .* on host node7.*taken over once its heartbeat"):
        RunLock.acquire(tmp_path)
    fake_lock(tmp_path, machine="node7/boot/ns", host="node7", age_s=run_lock.STALE_S + 5)
    RunLock.acquire(tmp_path).release()


def test_lock_of_an_earlier_attempt_of_this_job_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    # A fresh heartbeat from another host: only the restart count tells it is dead.
    fake_lock(tmp_path, machine="node7/boot/ns", job="torchrun:job-1", attempt=[0, 0])
    RunLock.acquire(tmp_path).release()
    fake_lock(tmp_path, machine="node7/boot/ns", job="torchrun:job-1", attempt=[0, 1])
    with pytest.raises(ValueError, match="in use by another run"):
        RunLock.acquire(tmp_path)


def test_breaking_a_lock_that_a_racing_run_replaced_puts_it_back(tmp_path):
    dead = fake_lock(tmp_path, pid=dead_pid())
    judged = dead.read_text()
    racer = fake_lock(tmp_path, token="racer")  # replaced between our read and our rename
    run_lock._break(dead, judged, Owner.current(), "test")
    assert json.loads(racer.read_text())["token"] == "racer"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock.acquire(tmp_path)
    old = time.time() - 100
    os.utime(lock.path, (old, old))
    time.sleep(0.5)
    assert time.time() - lock.path.stat().st_mtime < 5
    lock.release()


# Signals -------------------------------------------------------------------------------------
SIGNAL_SCRIPT = """
import os, signal, sys, time
from llama_dist.train.step import StopSignal
stop = StopSignal()
os.kill(os.getpid(), signal.SIG{first})
time.sleep(0.3)
print("received", stop.reason, flush=True)
os.kill(os.getpid(), signal.SIG{second})
time.sleep(10)
print("still running", stop.reason, flush=True)
"""


@pytest.mark.parametrize(
    ("first", "second", "code"), [("INT", "INT", 130), ("INT", "TERM", 143), ("TERM", "TERM", 0)]
)
def test_ctrl_c_is_a_stop_request_and_a_second_one_exits_at_once(first, second, code):
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-c", SIGNAL_SCRIPT.format(first=first, second=second)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert f"received SIG{first}" in out.stdout, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == code, out.stdout + out.stderr
    if code:  # at once, not after the 10 s sleep
        assert "still running" not in out.stdout and time.time() - started < 9
        assert "exiting now, without a checkpoint" in out.stderr
    else:  # a repeated SIGTERM (schedulers repeat theirs) stays a stop request
        assert "still running SIGTERM" in out.stdout


# Incomplete step folders -------------------------------------------------------------------
def incomplete_worker(cfg, run_dir: str) -> dict:
    run_dir = Path(run_dir)
    run(cfg, run_dir, stop_after=4)  # checkpoints at steps 2 and 4
    step4 = run_dir / "checkpoints" / "step-00000004"
    # What `cp -r step-4/* elsewhere/` gives: every file but the hidden .metadata.
    (step4 / ".metadata").unlink()
    return run(cfg, run_dir)


def test_a_step_folder_without_metadata_is_set_aside_and_never_blocks(tmp_path, caplog):
    cfg = job(write_corpus(tmp_path / "corpus"), "train.steps=6", "checkpoint.every=2")
    losses = run_distributed(incomplete_worker, 1, cfg, str(tmp_path / "run"))
    assert sorted(losses) == list(range(1, 7))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert [n for n in names if n.startswith("step-00000004.incomplete-")], names
    assert "step-00000006" in names  # the run went on past the step it set aside


# Collective timeout ------------------------------------------------------------------------
def stalled_worker(cfg, run_dir: str) -> str:
    import llama_dist.train.pretrain as pretrain_module
    from llama_dist.train.pretrain import pretrain

    forward_backward = pretrain_module.forward_backward
    calls = []

    def slow_on_rank_1(*args, **kwargs):
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 2:
            time.sleep(4 * cfg.train.collective_timeout_s)  # a stalled rank
        return forward_backward(*args, **kwargs)

    pretrain_module.forward_backward = slow_on_rank_1
    started = time.time()
    try:
        run_job("pretrain", pretrain, cfg, Path(run_dir))
    except RuntimeError as e:
        return f"{type(e).__name__} after {time.time() - started:.0f} s: {e}"
    return "no error"


def test_a_stalled_rank_is_named_when_the_configured_timeout_fires(tmp_path):
    cfg = job(write_corpus(tmp_path / "corpus"), "train.collective_timeout_s=4")
    message = run_distributed(stalled_worker, 2, cfg, str(tmp_path / "run"), init=False)
    assert message.startswith("CollectiveTimeout"), message
    assert "longer than the 4 s timeout (train.collective_timeout_s)" in message
    assert "rank 1 stopped answering" in message
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released on the way out


def test_collective_timeout_must_be_positive(tmp_path):
    from llama_dist.config import validate_job

    with pytest.raises(ValueError, match="train.collective_timeout_s=0.0 must be positive"):
        validate_job(job(tmp_path / "x", "train.collective_timeout_s=0"), 1)


# Exported files' permissions ----------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_hf_export_files_get_the_users_normal_mode(tmp_path, umask):
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=64).validate()
    model = Llama(cfg)
    model.init_weights(0)
    old = os.umask(umask)
    try:
        single = save_hf_folder(model.state_dict(), cfg, tmp_path / "single")
        sharded = save_hf_folder(model.state_dict(), cfg, tmp_path / "sharded", max_shard_bytes=1e5)
    finally:
        os.umask(old)
    files = [*single.iterdir(), *sharded.iterdir()]
    assert any(f.name == "model.safetensors" for f in files)
    assert sum(f.suffix == ".safetensors" for f in files) > 2
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    for folder in (single, sharded):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


# Through the real entry point under torchrun ----------------------------------------------
def pretrain_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "launch/pretrain.py",
        "model=debug",
        f"data.paths=[{data}]",
        "data.seq_len=32",
        "train.global_batch_tokens=256",
        "train.micro_batch=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.wandb=false",
        "train.device=cpu",
        "optim.warmup_steps=2",
        "checkpoint.every=1000",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen(
            [*LAUNCH, *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,  # its own process group, as a terminal gives a job
        )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and max(train_losses(run_dir), default=0) < step:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    assert max(train_losses(run_dir), default=0) >= step, log.read_text()[-3000:]


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher.pid}")


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_one_run_per_folder_ctrl_c_saves_and_exit_codes_say_how_it_ended(tmp_path):
    data = write_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    # Far more steps than the test waits for: the runs are stopped, never finish.
    args = pretrain_args(data, run_dir, "train.steps=100000")

    # A second run on a live folder is refused at once, the owner named; the first goes on.
    first = start(args, tmp_path / "first.log")
    wait_for_step(run_dir, 2, first, tmp_path / "first.log")
    owner = json.loads((run_dir / LOCK_FILE).read_text())
    config_written = (run_dir / "config.yaml").stat().st_mtime
    second = subprocess.run(
        [*LAUNCH, *args], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=240
    )
    assert second.returncode == 2, second.stdout + second.stderr
    assert (
        f"pretrain: error: {run_dir} is in use by another run: pid {owner['pid']} on host "
        f"{owner['host']}, started "
    ) in second.stderr
    assert (run_dir / "config.yaml").stat().st_mtime == config_written
    assert first.poll() is None

    # Ctrl-C: every worker finishes its step, saves and exits; nothing is lost, no traceback.
    os.killpg(first.pid, signal.SIGINT)
    assert first.wait(timeout=240) == 128 + signal.SIGINT  # torchrun itself got the signal
    log = (tmp_path / "first.log").read_text()
    assert "SIGINT: finishing the step, saving a checkpoint" in log, log[-3000:]
    assert "KeyboardInterrupt" not in log, log[-3000:]
    [stopped] = checkpoint_steps(run_dir)
    assert stopped >= 2 and f"stopped at step {stopped} of 100000 (SIGINT)" in log, log[-3000:]
    assert not (run_dir / LOCK_FILE).exists()

    # A lock left by a dead run is taken over; SIGTERM to one worker stops every rank with a
    # checkpoint, and the launcher exits 3, saying how to resume.
    fake_lock(run_dir, pid=dead_pid())
    resumed = start(args, tmp_path / "resumed.log")
    wait_for_step(run_dir, stopped + 2, resumed, tmp_path / "resumed.log")
    os.kill(worker_pid(resumed, rank=1), signal.SIGTERM)
    assert resumed.wait(timeout=240) == 3
    log = (tmp_path / "resumed.log").read_text()
    assert "is gone" in log and "taking over" in log, log[-3000:]
    last = checkpoint_steps(run_dir)[-1]
    assert last >= stopped + 2
    assert f"stopped at step {last} of 100000 (a signal to another rank)" in log, log[-3000:]
    assert "To resume, run the same command again" in log
    assert "llama_dist.torchrun: exit code 3" in log

    # A run that reaches its last step exits 0 (ending sooner moves the learning rate of the
    # resumed step, which a resume refuses unless allowed).
    done = subprocess.run(
        [*LAUNCH, *args[:-1], f"train.steps={last + 2}", "checkpoint.allow_changes=[train.steps]"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(train_losses(run_dir)) == list(range(1, last + 3))
    assert not (run_dir / LOCK_FILE).exists()


def test_the_training_code_carries_no_fault_injection():
    # Crashes for the restart tests come from tests/train/faulty_pretrain.py, a wrapper of the
    # entry point; the library itself never kills its own process.
    for path in sorted((ROOT / "src" / "llama_dist").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"\bFAULT_|_FAULT_|os\.kill\(os\.getpid\(\)", text), path
