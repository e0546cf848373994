#!/usr/bin/env bash
# Sets everything up, then runs the main job: prune the default model (SmolLM2-135M) to 50% with
# Wanda on self-generated calibration text, reconstruct it in windows of two blocks (the "quick"
# preset: BR+GP+CR, one epoch), evaluate, save to runs/quickstart, print a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${PRUNEKIT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export PRUNEKIT_DATA_DIR="$(cd ../shared/data && pwd)"
fi
.venv/bin/prunekit prune --out "${1:-runs/quickstart}" --overwrite
