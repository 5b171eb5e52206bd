#!/usr/bin/env bash
# The GPU row of README "Performance": bench.py's GPU suite on one GPU, its report into $OUT (else out/bench).
# The suite (bench.SUITES['gpu']): the paper's M1 (gld-paper, V=8, 504x504 = 10,368 tokens, batch 1) in bf16, eager
# and compiled, activation checkpointing off and on; an Euler step with CFG; bf16 + compiled + flash checked against
# fp32 eager; the SDPA backend; the cascade (M1, gld-paper-cascade) on one scene at 50 steps with da3-base and the
# xl decoder.
# Planned work, from model.flops_per_token: a forward of M1 is 28.5 TFLOP, of M1->0 18.7. The training rows 2,790
# TFLOP (4 rows of 7 steps, 3 passes each, and checkpointing's extra forward), the Euler rows 800, the checks 680
# (half in fp32), the scene 4,820 (a 1-step warm-up and 50 CFG steps of each model): about 30 s at 30% of the
# H100's 989 TFLOP/s, 10 s more for fp32. Compiling (each block width once per mode, bench.compile_blocks) and
# starting should take 1-3 minutes: 3-5 minutes in all. At 6 minutes the run is interrupted (SIGINT): the report
# keeps what it measured, and a 15-minute lease holds a rerun.
#
#   bash recipes/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/bench}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
timeout -s INT 360 "${PYTHON:-python3}" -u bench.py --suite gpu --report "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
