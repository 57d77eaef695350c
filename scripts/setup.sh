#!/usr/bin/env bash
# Create .venv (once) and install sigmma-sc with its extras.
# torch==2.13.0 goes first: it is a CPU wheel on local disk here; any other spec pulls a multi-GB CUDA build.
# Usage: bash scripts/setup.sh [extras], e.g. `bash scripts/setup.sh test,doc`
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[${extras}]"
else
  .venv/bin/python -m pip install -q -e .
fi
