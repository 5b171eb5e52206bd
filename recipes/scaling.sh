#!/usr/bin/env bash
# The scaling probe of M1 (issue 32): three widths of the same DiT trained from scratch with the same data, recipe and
# training time (--budget-minutes counts the process's CPU time, so runs that share cores get equal compute), each
# evaluated every 250 steps on the held-out scenes (val_mean_psnr: the posterior mean, the default sampler). The plot:
# `python docs/plots.py` (docs/scaling.png, from the runs' logs copied to docs/logs/probe_*.csv); the table: README.
#
#   BUDGET=35 bash recipes/scaling.sh        # minutes of CPU time per width; the three run side by side
#
# Arguments after the script's name are passed on to every train.py (the tests run it in miniature that way).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
BUDGET="${BUDGET:-35}"
DATA="${DATA:-data_synth_1200}"
RUNS="${RUNS:-runs}"
test -d "$DATA" || python data.py synth --train 1200 --out "$DATA"
pids=()
for model in gld-tiny gld-tiny-2x gld-tiny-4x; do
    python train.py --level 1 --model "$model" --data "$DATA" --views 8 --batch-size 4 --steps 1000000 --lr 5e-4 \
        --warmup 100 --gap 2-3 --src-mode ends --bf16 --eval-every 250 --budget-minutes "$BUDGET" \
        --out "$RUNS/probe_$model" --export "$RUNS/probe_$model/export" "$@" &
    pids+=($!)
done
for pid in "${pids[@]}"; do
    wait "$pid"
done
