#!/usr/bin/env bash
# GPU benchmarks at GPT-2-small scale (124M parameters, built from config: nothing is downloaded), bf16 autocast
# (trainers/precision.py), JSON into $OUT_DIR (default benchmarks/results/gpu-<commit>/):
#   dp_overhead.json   non-private vs the engine (auto and materialised) vs Opacus hooks and ghost clipping, LoRA
#                      on c_attn with one record per user and on every linear layer with 4-record users
#   ppo_iteration.json the share of a DP-PPO iteration per phase and generate tokens/s vs plain model.generate
# Sized to finish in well under 10 minutes on one modern GPU; `make bench-gpu` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "benchmarks/gpu.sh: no CUDA device (torch.cuda.is_available() is False)")'
OUT_DIR=${OUT_DIR:-benchmarks/results/gpu-$(git rev-parse --short HEAD 2>/dev/null || echo local)}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 420 "$PY" benchmarks/dp_overhead.py --sizes small --settings attn1,all4 --steps 5 --batch 32 --seq 128 \
    --variants nonprivate,engine,engine_ref,opacus,opacus_ghost --json-out "$OUT_DIR/dp_overhead.json"
timeout 150 "$PY" benchmarks/ppo_iteration.py --size small --records 192 --eval-prompts 64 --iterations 2 \
    --max-new-tokens 24 --rollout-batch-size 64 --json-out "$OUT_DIR/ppo_iteration.json"
echo "wrote $OUT_DIR/dp_overhead.json and $OUT_DIR/ppo_iteration.json"
