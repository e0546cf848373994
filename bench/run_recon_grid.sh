#!/usr/bin/env bash
# The issue-3 reconstruction benchmark (protocol cpu-recon-v1 by default; see bench/recon_grid.py):
# 1. the grid {wanda, sparsegpt, magnitude} x {lr, br, br-gp, br-gp-cr, attn-mlp-gp} with C4 calibration;
# 2. self-generated vs C4 calibration for br-gp and br-gp-cr at two calibration sizes (Wanda);
# 3. the error-vs-block plot for lr, br, br-gp, br-gp-cr (Wanda) with `prunekit error`.
# Runs already in bench/results/PROTOCOL are skipped. Several workers may run at once (e.g. one per
# core with OMP_NUM_THREADS=1): each claims a run by creating a directory, so none is run twice.
# Usage: bash bench/run_recon_grid.sh [--plot-only]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
P=${PROTOCOL:-cpu-recon-v1}
SIZES=${SIZES:-"8 16"}
GRID_N=16  # the grid's own calibration size under cpu-recon-v1: its c4 runs double as the calib-size study's
R=bench/results/$P
CLAIMS=bench/work/$P/.claims
mkdir -p "$R" "$CLAIMS"

run() {  # run ARGS...: run once, unless done or claimed by another worker (recon_grid.py names the run)
  local name
  name=$("$PY" bench/recon_grid.py "$@" --protocol "$P" --print-name)
  [ -f "$R/$name.json" ] && return 0
  mkdir "$CLAIMS/$name" 2>/dev/null || return 0
  echo "=== $name $(date -Is)"
  if ! "$PY" bench/recon_grid.py "$@" --protocol "$P"; then
    rmdir "$CLAIMS/$name"
    return 1
  fi
}

W=bench/work/$P
if [ -n "${RUNS:-}" ]; then  # RUNS="wanda-lr wanda-br-gp:--lr=0.001 ...": only these (NAME[:EXTRA ARGS, comma-separated])
  for spec in $RUNS; do
    base=${spec%%:*}; extra=""; [ "$spec" != "$base" ] && extra=${spec#*:}
    run "$base" ${extra//,/ }
  done
  exit 0
fi
if [ "${1:-}" != "--plot-only" ]; then
  if [ ! -f "$R/dense.json" ] && [ -d bench/work/smollm2-135m-f32 ] && mkdir "$CLAIMS/dense" 2>/dev/null; then
    echo "=== dense $(date -Is)"
    .venv/bin/prunekit eval --model bench/work/smollm2-135m-f32 --data wikitext2,c4 --eval-seqlen 512 \
      --eval-windows 16 --eval-batch-size 8 --data-dir "${PRUNEKIT_DATA_DIR:-../shared/data}" --out "$W/dense"
    cp "$W/dense/metrics.json" "$R/dense.json"
  fi
  for crit in wanda sparsegpt magnitude; do
    for preset in lr br br-gp br-gp-cr attn-mlp-gp; do
      run "$crit-$preset"
    done
  done
  for n in $SIZES; do
    for preset in br-gp br-gp-cr; do
      for calib in c4 self; do
        [ "$calib" = c4 ] && [ "$n" = "$GRID_N" ] && continue  # the grid run itself
        run "wanda-$preset" --calib "$calib" --nsamples "$n"
      done
    done
  done
fi
if [ ! -f "$R/error-vs-block/errors.json" ] && mkdir "$CLAIMS/error-vs-block" 2>/dev/null; then
  .venv/bin/prunekit error --dense bench/work/smollm2-135m-f32 --data wikitext2 --eval-seqlen 512 --eval-windows 8 \
    --data-dir "${PRUNEKIT_DATA_DIR:-../shared/data}" \
    --model "$W/wanda-lr" "$W/wanda-br" "$W/wanda-br-gp" "$W/wanda-br-gp-cr" --out "$R/error-vs-block"
fi
