#!/usr/bin/env bash
# The GPU checks for a session that is lent one H100 (or H200), in one call of about 8 minutes:
#   bash benchmarks/gpu_session.sh            # results under $OUT (or benchmarks/results/)
# It uses the machine's own python3 and torch with this checkout on PYTHONPATH (no install:
# the device image has no network). Results: the MFU matrix of a 7B-shaped model (16 of its 32
# layers, to leave memory for activations and the HF baseline) against HF LlamaForCausalLM.
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
# 7B shape, bf16, sequence 4096: the brief's target is >= 60% MFU on one H100.
timeout 420 "$PY" benchmarks/mfu.py --preset 7b --n-layers 16 --seq-len 4096 \
    --micro-batch 1 2 --ac selective none --compile on off --steps 6 --warmup 3 \
    --out "$OUT/h100_7b_16_layers.md" 2>&1 | tee "$OUT/mfu_log.txt"
