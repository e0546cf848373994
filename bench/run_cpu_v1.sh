#!/usr/bin/env bash
# Runs every cpu-v1 benchmark run in sequence (about 2 hours on a 2-core CPU), then the summary.
# Usage: bash bench/run_cpu_v1.sh [RUN ...]   (default: all runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(wanda-50 sparsegpt-50 dense magnitude-50 wanda-2:4 sparsegpt-2:4 magnitude-2:4)
for r in "${runs[@]}"; do
  echo "=== $r $(date -Is)"
  "$PY" bench/cpu_v1.py "$r"
done
"$PY" bench/summarize.py
