# shellcheck shell=bash
# The body of the per-model batch scripts (llama7b.sbatch, ...), sourced by them; slurm/README.md
# is the user's guide. `pretrain OVERRIDES...` starts one torchrun per node with c10d rendezvous
# on the allocation's first node, trains into a run folder tied to the job id, and on Slurm's
# warning signal makes the trainers checkpoint, then requeues the job, which resumes.
# `run_stage SCRIPT OVERRIDES...` does the same for any entry point (the recipe's stages,
# written by `launch/recipe.py action=slurm`).
#
# Environment (all optional):
#   DEVICE          cuda (default) or cpu; passed as train.device by `pretrain`
#   NPROC_PER_NODE  processes per node (default: the GPUs Slurm gave the node, else 8)
#   RUNS_DIR        parent of run folders (default runs); the run folder is
#                   $RUNS_DIR/<job name>-<job id>, the same after a requeue
#   RUN_DIR         the run folder itself, e.g. to continue an earlier job's run
#   RDZV_HOST       rendezvous address (default: the first node's address, from Slurm)
#   RDZV_PORT       rendezvous port (default 29500 + job id % 1000)
#   MAX_RESTARTS    torchrun restarts of all workers after a failure (default 0)
#   PYTHON          interpreter (default .venv/bin/python of the checkout, else python3)
#   FABRIC          ib (default), roce or socket: the NCCL settings below

set -euo pipefail

say() { echo "[slurm $(date +%T)] $*"; }

# The checkout this file belongs to: a batch script runs from a copy in Slurm's spool folder,
# so the wrappers find this file through $SLURM_SUBMIT_DIR and everything else is relative to it.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "slurm/common.sh: run the batch scripts with sbatch, e.g. sbatch slurm/llama7b.sbatch" >&2
    exit 2
fi

# NCCL over InfiniBand or RoCE. Each variable is set only when it is not set already, so a
# value exported before sbatch wins (sbatch and srun pass the environment on).
#   ib      InfiniBand: NCCL finds the HCAs itself; NCCL_IB_HCA narrows them (mlx5_0,mlx5_1 or
#           =mlx5_0:1 for exact names and ports). NCCL_SOCKET_IFNAME picks the interface of
#           NCCL's bootstrap (e.g. ib0 or ^lo,docker).
#   roce    RoCE v2 over Ethernet NICs: NCCL_IB_GID_INDEX selects the RoCE v2 IPv4 GID (3 on
#           most Mellanox/NVIDIA setups; `show_gids` lists them); set NCCL_IB_TC to the
#           fabric's lossless traffic class and NCCL_SOCKET_IFNAME to the RoCE interface.
#   socket  TCP only (no RDMA): NCCL_IB_DISABLE=1.
set_default() { [[ -n ${!1:-} ]] || export "$1=$2"; }

FABRIC=${FABRIC:-ib}
case $FABRIC in
    ib) ;;
    roce) set_default NCCL_IB_GID_INDEX 3 ;;
    socket) set_default NCCL_IB_DISABLE 1 ;;
    *)
        echo "slurm/common.sh: FABRIC=$FABRIC must be ib, roce or socket" >&2
        exit 2
        ;;
esac
set_default NCCL_DEBUG WARN
set_default PYTHONUNBUFFERED 1 # the log follows the run

# The first node's address as the other nodes reach it: Slurm's NodeAddr (the node name
# unless the site set one), resolved here.
head_address() {
    local node addr
    node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    addr=$(scontrol show node "$node" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    addr=${addr:-$node}
    getent ahostsv4 "$addr" | awk 'NR == 1 { print $1 }' | grep . || echo "$addr"
}

# Interrupted by a trapped signal, `wait` returns (> 128) while srun still runs; wait again.
wait_for() {
    local status
    while true; do
        wait "$1" && return 0 || status=$?
        if ((status > 128)) && kill -0 "$1" 2>/dev/null; then
            continue
        fi
        return "$status"
    done
}

# USR1 is the warning Slurm sends the batch shell alone before the time limit
# (--signal=B:USR1@...): the trainers checkpoint and exit, then the job requeues itself. TERM
# comes with scancel, preemption and the time limit itself, and reaches srun too, which turns it
# into SIGKILL of its tasks; USR1 is passed on all the same, but the job is not requeued here
# (that would undo a scancel; PreemptMode=REQUEUE requeues by itself). USR1 goes to every process
# of the job steps (scancel without --batch spares the batch shell); torchrun ignores it, below.
STOP_SIGNAL=
RESENDER=
on_signal() {
    [[ -z $STOP_SIGNAL ]] || return 0
    STOP_SIGNAL=$1
    say "SIG$1: asking the trainers to checkpoint and stop"
    # Again every minute until the step ends: a trainer still starting up ignores USR1.
    while true; do
        scancel --signal=USR1 "$SLURM_JOB_ID" || true
        sleep 60
    done &
    RESENDER=$!
}

# `run_stage SCRIPT [--config-name NAME] OVERRIDES...` runs one entry point (launch/*.py) as a
# job step: one torchrun per node, c10d rendezvous on the first node, into the run folder
# (hydra.run.dir). It returns the trainers' exit status; on Slurm's warning signal the trainers
# checkpoint and the job is requeued (exit 0 here), and the requeued job resumes.
run_stage() {
    local script=$1
    shift
    local nnodes=$SLURM_NNODES
    local nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    local head port run_dir python
    trap 'on_signal USR1' USR1
    trap 'on_signal TERM' TERM
    head=${RDZV_HOST:-$(head_address)}
    port=${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
    run_dir=${RUN_DIR:-${RUNS_DIR:-runs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
    python=${PYTHON:-python3}
    if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then
        python=$ROOT/.venv/bin/python
    fi
    mkdir -p "$run_dir"

    say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $nnodes nodes" \
        "$SLURM_JOB_NODELIST, $nproc processes each: $script"
    say "rendezvous $head:$port; run folder $run_dir; checkout $ROOT; python $python"
    say "environment: $(env | grep -E '^(NCCL|GLOO)_' | sort | tr '\n' ' ')"

    local torchrun=(
        --nnodes "$nnodes"
        --nproc-per-node "$nproc"
        --rdzv-backend c10d
        --rdzv-endpoint "$head:$port"
        --rdzv-id "$SLURM_JOB_ID"
        --max-restarts "${MAX_RESTARTS:-0}"
    )
    # The caller's overrides come last, so they win over this one.
    local overrides=("hydra.run.dir=$run_dir" "$@")
    # One torchrun per node; the first node hosts the rendezvous store (is_host), whatever its
    # name resolves to. torchrun ignores USR1 (an ignored signal stays ignored across exec and
    # in the workers it spawns) and the trainers install their own handler for it.
    # shellcheck disable=SC2016  # the inner script expands on each node
    srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 \
        ${SLURM_CPUS_ON_NODE:+--cpus-per-task="$SLURM_CPUS_ON_NODE"} \
        --kill-on-bad-exit=1 --label \
        bash -c 'trap "" USR1
            echo "node $SLURMD_NODENAME ($SLURM_NODEID): starting torchrun"
            exec "$0" -m torch.distributed.run --rdzv-conf "is_host=$((SLURM_NODEID == 0))" "$@"' \
        "$python" "${torchrun[@]}" "$script" "${overrides[@]}" &
    local srun_pid=$! status=0
    wait_for "$srun_pid" || status=$?
    trap - USR1 TERM
    [[ -z $RESENDER ]] || kill "$RESENDER" 2>/dev/null || true

    if [[ $STOP_SIGNAL == USR1 ]]; then
        say "trainers stopped (exit status $status); requeueing job $SLURM_JOB_ID to resume" \
            "from the latest checkpoint in $run_dir"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    say "$script: training exited with status $status"
    return "$status"
}

# `pretrain OVERRIDES...`: the per-model batch scripts' pretraining run.
pretrain() {
    local status=0
    run_stage launch/pretrain.py "train.device=${DEVICE:-cuda}" "checkpoint.resume=auto" "$@" ||
        status=$?
    exit "$status"
}
