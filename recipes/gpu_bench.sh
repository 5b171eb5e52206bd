#!/usr/bin/env bash
# The GPU row of README "Performance": bench.py's GPU suite on one GPU, its report written to $OUT (else out/bench).
# The suite (bench.SUITES['gpu']): the paper's M1 (gld-paper, V=8, 504x504 = 10,368 tokens, batch 1) in bf16, eager
# and compiled, activation checkpointing off and on; an Euler step with CFG; the cascade (M1, gld-paper-cascade) on
# one scene at 50 steps with da3-base and the xl decoder; the bf16 + compiled + flash path checked against fp32 eager.
# Planned work, from model.flops_per_token: a forward of M1 is 28.5 TFLOP, of M1->0 18.7; the training rows
# 2,790 TFLOP (4 rows x 7 steps, 3 passes each, checkpointing's extra forward), the Euler rows 800, the scene 4,720
# (50 CFG steps of each model), the checks 680 (half of it in fp32): about 30 s at 30% of the H100's 989 TFLOP/s,
# 10 s more for fp32. Compilation (each block width once per mode, bench.compile_blocks) and start-up should take
# 1-3 minutes: about 3-5 minutes in all, under the 6-minute timeout below, so a 15-minute lease holds a rerun.
#
#   bash recipes/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/bench}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
timeout 360 "${PYTHON:-python3}" -u bench.py --suite gpu --report "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
