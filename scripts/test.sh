#!/usr/bin/env bash
# README command 2: set up, then run the whole test suite (Triton kernels run in the interpreter
# on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" -m pytest -q "$@"
