#!/usr/bin/env bash
# The device benchmark (bench/gpu.py, issue 12) in one call of the `device` tool, sized to fit in
# 8 minutes of device time with the machine's start-up (about 1-2 minutes).
#
# The exact call, from a session whose task is lent a GPU (status: can_start_another true), with
# the checkout at the commit to measure (HASH: `git rev-parse HEAD` here; .git does not travel):
#
#   run(command="PRUNEKIT_COMMIT=HASH bash bench/gpu_device.sh", timeout_s=420)
#
# No carry is needed: the model is built with random weights on the machine, nothing is installed.
# Then copy the result folder back into the repository and commit it with the machine named:
#
#   cp -r <files_at>/<machine>-<date> bench/results/gpu/
#
# It runs `bench/gpu.py --shape 7b --default-model` with a time budget of GPU_BENCH_BUDGET_S
# seconds (default 240): configurations that would not fit are skipped and listed in the JSON,
# results are written after every configuration, and a hard `timeout` ends the run 60 s after
# the budget. DEFAULT_MODEL=0 leaves out the default model's shape, DIST_CHECK=0 the NCCL check (for a
# short rerun of a few configurations). Extra arguments go to gpu.py (e.g. `--configs wanda-brgp-bf16,wanda-brgp-fp32` for a
# shorter rerun). On the machine it writes $OUT/<machine>-<date>/{gpu.json,gpu.md,gpu.log} and
# $OUT/nvidia-smi.txt (the tool brings back at most 8 files, 2 folders down), then issue 14's NCCL
# check (bench/dist_device_check.py under torchrun with one process) into $OUT/dist_check.json.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
BUDGET=${GPU_BENCH_BUDGET_S:-240}
PYTHON=${PYTHON:-python3}
export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
LOG=$(mktemp)
timeout --signal=TERM --kill-after=10 $((BUDGET + 60)) \
  "$PYTHON" bench/gpu.py --shape 7b $([ "${DEFAULT_MODEL:-1}" = 1 ] && echo --default-model) --budget-s "$BUDGET" --out-parent "$OUT" "$@" 2>&1 | tee "$LOG"
rc=$?
# the log goes beside the results (gpu.py names the folder after the GPU and the date)
dir=$(sed -n 's/^\[gpu-bench\] .* | out \(.*\)$/\1/p' "$LOG" | head -1)
if [ -n "$dir" ] && [ -d "$dir" ]; then cp "$LOG" "$dir/gpu.log"; else cp "$LOG" "$OUT/gpu.log"; fi
rm -f "$LOG"
# issue 14: the NCCL path on one GPU (torchrun, world size 1): about 30 s; $OUT/dist_check.json
[ "${DIST_CHECK:-1}" = 1 ] && timeout --signal=TERM --kill-after=10 120 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 \
  bench/dist_device_check.py "$OUT" 2>&1 | tail -5
echo "[gpu-device] exit $rc; results under $OUT"
exit $rc
