#!/usr/bin/env bash
# README command 1: set up, then run the main job on the embedded model (smollm2-135m):
# measure the base (held-out loss on GSM8K test reference solutions, accuracy on GSM8K test
# problems), fine-tune with LoRA on GSM8K train, measure again, export the merged model and print
# a before/after table. Under 15 minutes on 2 CPU cores (small slices there, larger ones on a
# GPU). Outputs go to runs/main-job/.
# Extra arguments go to `fastadapt main-job` (see `python -m fastadapt main-job --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" -m fastadapt main-job --output runs/main-job "$@"
