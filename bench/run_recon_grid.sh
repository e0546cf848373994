#!/usr/bin/env bash
# The issue-3 reconstruction benchmark under protocol cpu-recon-v1 (several hours on 2 CPU cores):
# 1. the grid {magnitude, wanda, sparsegpt} x {lr, br, br-gp, br-gp-cr, attn-mlp-gp} with C4 calibration;
# 2. self-generated vs C4 calibration for br-gp and br-gp-cr at two calibration sizes (Wanda);
# 3. the error-vs-block plot for lr, br, br-gp, br-gp-cr (Wanda) with `prunekit error`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
P=${PROTOCOL:-cpu-recon-v1}
for preset in lr br br-gp br-gp-cr attn-mlp-gp; do
  for crit in wanda sparsegpt magnitude; do
    [ -f "bench/results/$P/$crit-$preset.json" ] || "$PY" bench/recon_grid.py "$crit-$preset" --protocol "$P"
  done
done
for n in 16 64; do
  for preset in br-gp br-gp-cr; do
    for calib in c4 self; do
      [ -f "bench/results/$P/wanda-$preset-$calib-$n.json" ] || "$PY" bench/recon_grid.py "wanda-$preset" --protocol "$P" --calib "$calib" --nsamples "$n"
    done
  done
done
.venv/bin/prunekit error --dense smollm2-135m --data wikitext2 --eval-seqlen 512 --eval-windows 16 \
  --model bench/work/$P/wanda-lr bench/work/$P/wanda-br bench/work/$P/wanda-br-gp bench/work/$P/wanda-br-gp-cr \
  --out bench/results/$P/error-vs-block
