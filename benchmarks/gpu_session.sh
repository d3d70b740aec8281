#!/usr/bin/env bash
# The GPU checks for a session that is lent one H100 (or H200), in one call of about 8 minutes:
#   bash benchmarks/gpu_session.sh            # results under $OUT (or benchmarks/results/)
# It uses the machine's own python3 and torch with this checkout on PYTHONPATH (no install:
# the device image has no network). Results: the MFU matrix of a 7B-shaped model (16 of its 32
# layers, to leave memory for activations and the HF baseline): the trainer's own step, the
# bare model and HF LlamaForCausalLM; the trainer's step on every GPU; the checkpoint stall.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu_env.txt"
# 7B shape, bf16, sequence 4096: the brief's target is >= 60% MFU on one H100, through the
# trainer's own step (FSDP2 mixed precision, fp32 master weights), the bare model and HF beside it.
timeout 360 "$PY" benchmarks/mfu.py --preset 7b --n-layers 16 --seq-len 4096 \
    --micro-batch 1 2 --ac selective none --compile on off --steps 6 --warmup 3 \
    --out "$OUT/h100_7b_16_layers.md" 2>&1 | tee "$OUT/mfu_log.txt"
# The same step on every GPU of the machine (what a user of launch/pretrain.py gets per GPU).
NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -gt 1 ]; then
    timeout 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" \
        benchmarks/mfu.py --preset 7b --seq-len 4096 --micro-batch 2 --ac selective \
        --compile on --steps 6 --warmup 3 --impl trainer \
        --out "$OUT/h100_7b_trainer_${NGPU}gpus.md" 2>&1 | tee "$OUT/mfu_ngpu_log.txt"
fi
# Training stall per checkpoint save, sync and async (pinned staging).
timeout 120 "$PY" benchmarks/checkpoint_stall.py --preset 7b --n-layers 8 --seq-len 2048 \
    --saves 3 --every 2 --out "$OUT/checkpoint_stall_gpu.md" 2>&1 | tee "$OUT/stall_log.txt"
