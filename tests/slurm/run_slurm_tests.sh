#!/usr/bin/env bash
# The Slurm templates (slurm/) end to end on one machine posing as a two-node cluster, n1 and
# n2 (two slurmd on 127.0.0.1, one CPU each): a job rendezvouses across both nodes, trains and
# checkpoints; a second job resumes from that checkpoint; a third gets Slurm's warning signal,
# checkpoints, requeues itself and finishes from where it stopped; a fourth, cancelled, stays
# cancelled.
#
#   bash tests/slurm/run_slurm_tests.sh        # as root; needs the checkout's .venv (make install)
#
# Installs slurm-wlm and munge with apt-get when they are missing. munged, slurmctld and the
# slurmd run from a temporary folder (config, keys, state, logs, ports 26817-26819) and stop on
# exit, with any job left; nothing under /etc changes. On failure the logs are printed and the
# folder is kept.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=$ROOT/.venv/bin/python
CTLD_PORT=26817
NODE_PORTS=(26818 26819)
JOB_TIMEOUT=240 # seconds per job, requeue included

say() { echo "[slurm-test $(date +%T)] $*"; }
fail() {
    echo "[slurm-test $(date +%T)] FAIL: $*" >&2
    exit 1
}

[[ $EUID -eq 0 ]] || fail "run as root (it starts slurmctld, slurmd and munged)"
[[ -x $PY ]] || fail "no $PY; run make install first"

if ! command -v slurmctld slurmd munged sbatch >/dev/null; then
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    timeout 900 apt-get install -y -q slurm-wlm munge ||
        { timeout 300 apt-get update -q && timeout 900 apt-get install -y -q slurm-wlm munge; }
fi
for port in "$CTLD_PORT" "${NODE_PORTS[@]}"; do
    if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        fail "port $port is taken (another test cluster still running?)"
    fi
done

# Readable by all (munged checks every folder on its socket's path), private inside.
WORK=$(mktemp -d /tmp/llama-dist-slurm.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK"/{log,state,spool,logs,runs}
mkdir -m 700 "$WORK/keys"
mkdir -m 755 "$WORK/munge"
export SLURM_CONF=$WORK/slurm.conf
STARTED=$(date +%s)

dump_logs() {
    local f
    for f in "$WORK"/logs/*.out "$WORK"/log/*.log; do
        [[ -f $f ]] || continue
        echo "===== $f (last 60 lines)"
        tail -n 60 "$f"
    done
}

# Kill by pid file, then wait (bounded) for the process to go.
stop_pidfile() {
    local pid
    [[ -f $1 ]] || return 0
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$? pid left
    trap - EXIT
    set +e
    if ((status != 0)); then
        dump_logs >&2
    fi
    if [[ -f $WORK/slurmctld.pid ]]; then
        timeout 10 squeue -h -o %A | xargs -r timeout 10 scancel 2>/dev/null
        for _ in $(seq 30); do
            [[ -z $(timeout 5 squeue -h -o %A 2>/dev/null) ]] && break
            sleep 1
        done
    fi
    stop_pidfile "$WORK/slurmd.n1.pid"
    stop_pidfile "$WORK/slurmd.n2.pid"
    stop_pidfile "$WORK/slurmctld.pid"
    stop_pidfile "$WORK/munge/munged.pid"
    # Whatever the jobs left (they inherit SLURM_CONF, which names this folder).
    left=$(grep -lsF "SLURM_CONF=$WORK/" /proc/[0-9]*/environ | cut -d/ -f3)
    for pid in $left; do
        [[ $pid != "$$" ]] && kill -9 "$pid" 2>/dev/null
    done
    if ((status == 0)); then
        rm -rf "$WORK"
        say "passed in $(($(date +%s) - STARTED)) s"
    else
        echo "[slurm-test] failed; daemon logs, job logs and runs are in $WORK" >&2
    fi
    exit "$status"
}
trap cleanup EXIT

# --- the cluster ------------------------------------------------------------------------------
head -c 1024 /dev/urandom >"$WORK/keys/munge.key"
chmod 400 "$WORK/keys/munge.key"
munged --socket="$WORK/munge/munge.sock" --key-file="$WORK/keys/munge.key" \
    --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/log/munged.log" \
    --seed-file="$WORK/munge/seed" || fail "munged did not start"

# cred_expire is also how long a requeued job waits before it may start again (default 120 s);
# the short scheduler intervals start it soon after.
cat >"$SLURM_CONF" <<EOF
ClusterName=llamatest
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$WORK/munge/munge.sock,cred_expire=5
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool/slurmd.%n
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.%n.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=localhost Port=${NODE_PORTS[0]} CPUs=1 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=localhost Port=${NODE_PORTS[1]} CPUs=1 State=UNKNOWN
PartitionName=test Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF

say "starting slurmctld and slurmd n1, n2 in $WORK"
slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start"
slurmd -f "$SLURM_CONF" -N n1 || fail "slurmd n1 did not start"
slurmd -f "$SLURM_CONF" -N n2 || fail "slurmd n2 did not start"
node_states() { timeout 5 sinfo -h -N -o '%N=%t' 2>/dev/null | sort | tr '\n' ' '; }
for _ in $(seq 60); do
    [[ $(node_states) == "n1=idle n2=idle " ]] && break
    sleep 1
done
[[ $(node_states) == "n1=idle n2=idle " ]] || fail "nodes not idle after 60 s: $(sinfo -N 2>&1)"

# --- the jobs ---------------------------------------------------------------------------------
say "a: a synthetic corpus"
timeout 120 "$PY" - "$ROOT/tests/train" "$WORK/corpus" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from pretrain_helpers import write_corpus

write_corpus(Path(sys.argv[2]))
EOF

TRAIN=(
    model=debug
    parallel=fsdp
    "data.paths=[$WORK/corpus]"
    data.seq_len=32
    data.valid_fraction=0.05
    train.global_batch_tokens=256
    train.micro_batch=2
    train.log_every=1
    train.eval_every=0
    train.eval_batches=2
    train.wandb=false
    optim.warmup_steps=2
    checkpoint.every=1000
)

# The 70B template on two CPU "nodes", one process each; sbatch's options override the
# template's #SBATCH lines (--gpus-per-node=0: no GPUs on these nodes).
submit() {
    (cd "$ROOT" && DEVICE=cpu NPROC_PER_NODE=1 RUNS_DIR="$WORK/runs" timeout "$JOB_TIMEOUT" \
        sbatch --parsable --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --time=10 \
        --output="$WORK/logs/%x-%j.out" "$@")
}

job_log() { echo "$WORK/logs/llama70b-$1.out"; }
run_dir() { echo "$WORK/runs/llama70b-$1"; }

# `in_log LOG TEXT...`: LOG contains each TEXT (a fixed string).
in_log() {
    local log=$1 text
    shift
    for text in "$@"; do
        grep -qF -- "$text" "$log" || fail "$log lacks '$text'"
    done
}

# `check_metrics RUN STEPS WORLD`: RUN's metrics.jsonl logs train steps 1..STEPS in order, each
# once (a resumed job continues where the last one stopped), on WORLD ranks, the loss going down.
check_metrics() {
    "$PY" - "$@" <<'EOF'
import json
import sys
from pathlib import Path

run, steps, world = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
train = [r for r in rows if r["kind"] == "train"]
order = [r["step"] for r in train]
assert order == list(range(1, steps + 1)), f"train steps logged in order {order}"
for r in train:
    ratio = r["tokens_per_s"] / r["tokens_per_s_per_device"]
    assert round(ratio) == world, f"step {r['step']}: {ratio:.2f} devices, not {world}"
assert train[-1]["loss"] < train[0]["loss"], "the loss did not go down"
EOF
}

say "b: two nodes rendezvous, train 4 steps and checkpoint"
job1=$(submit --wait slurm/llama70b.sbatch "${TRAIN[@]}" train.steps=4) ||
    fail "job ${job1:-?} failed: $(job_log "$job1")"
log1=$(job_log "$job1") run1=$(run_dir "$job1")
in_log "$log1" "0: node n1 (0): starting torchrun" "1: node n2 (1): starting torchrun" \
    "rendezvous 127.0.0.1:" "run folder $run1" "training exited with status 0"
grep -qx "  dp_shard: 2" "$run1/config.yaml" || fail "$run1/config.yaml: not 2 data-parallel ranks"
check_metrics "$run1" 4 2 || fail "metrics of $run1"
[[ -d $run1/checkpoints/step-00000004 ]] || fail "no checkpoint step-00000004 in $run1"

say "c: a second job continues that run to step 8"
job2=$(RUN_DIR=$run1 submit --wait slurm/llama70b.sbatch "${TRAIN[@]}" train.steps=8 "checkpoint.allow_changes=[train.steps]") ||
    fail "job ${job2:-?} failed: $(job_log "$job2")"
in_log "$(job_log "$job2")" "resumed from $run1/checkpoints/step-00000004 at step 4" \
    "training exited with status 0"
check_metrics "$run1" 8 2 || fail "metrics of $run1 after the resume"
[[ -d $run1/checkpoints/step-00000008 ]] || fail "no checkpoint step-00000008 in $run1"

say "d: Slurm's warning signal: checkpoint, requeue, resume, finish"
submit --wait slurm/llama70b.sbatch "${TRAIN[@]}" train.steps=40 >"$WORK/job3" &
sbatch_pid=$!
for _ in $(seq 100); do
    [[ -s $WORK/job3 ]] && break
    sleep 0.1
done
job3=$(head -n1 "$WORK/job3")
[[ $job3 =~ ^[0-9]+$ ]] || fail "no job id from sbatch: '$job3'"
log3=$(job_log "$job3") run3=$(run_dir "$job3")
trained() {
    local n
    n=$(grep -cs '"kind": "train"' "$run3/metrics.jsonl") || true
    echo "${n:-0}"
}
for _ in $(seq 600); do
    (($(trained) >= 3)) && break
    kill -0 "$sbatch_pid" 2>/dev/null || fail "job $job3 ended before training 3 steps"
    sleep 0.2
done
# What Slurm does --signal=B:USR1@300 before the time limit: USR1 to the batch shell alone.
scancel --signal=USR1 --batch "$job3"
say "d: signalled job $job3 after $(trained) steps"
wait "$sbatch_pid" || fail "job $job3 failed or timed out"

stopped=$(grep -o 'stopping after step [0-9]*' "$log3" | head -n1 | grep -o '[0-9]*$') ||
    fail "$log3: the trainers did not stop on the signal"
((stopped < 40)) || fail "job $job3 finished before it was signalled"
saved=$(printf '%s/checkpoints/step-%08d' "$run3" "$stopped")
in_log "$log3" "SIGUSR1: asking the trainers to checkpoint and stop" \
    "requeueing job $job3" "job $job3 (restart 1)" \
    "resumed from $saved at step $stopped" "training exited with status 0"
check_metrics "$run3" 40 2 || fail "metrics of $run3"
[[ -d $run3/checkpoints/step-00000040 ]] || fail "no final checkpoint in $run3"
state=$(scontrol show job "$job3")
if ! grep -q "JobState=COMPLETED" <<<"$state" || ! grep -q "Restarts=1" <<<"$state"; then
    fail "job $job3 is not COMPLETED after one requeue: $state"
fi
say "d: stopped after step $stopped, requeued, resumed at step $((stopped + 1)), finished at 40"

say "e: scancel ends a job for good (no requeue on TERM)"
job4=$(submit slurm/llama70b.sbatch "${TRAIN[@]}" train.steps=100) || fail "sbatch failed"
log4=$(job_log "$job4")
for _ in $(seq 300); do
    grep -qF "starting torchrun" "$log4" 2>/dev/null && break
    sleep 0.2
done
in_log "$log4" "starting torchrun"
scancel "$job4"
for _ in $(seq 60); do
    grep -q "JobState=CANCELLED" <<<"$(scontrol show job "$job4")" && break
    sleep 0.5
done
sleep 5 # the batch script's last words come within a second or two
state=$(scontrol show job "$job4")
if ! grep -q "JobState=CANCELLED" <<<"$state" || ! grep -q "Restarts=0" <<<"$state"; then
    fail "job $job4 is not CANCELLED or was requeued: $state"
fi
in_log "$log4" "SIGTERM: asking the trainers to checkpoint and stop"
