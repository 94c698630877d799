#!/usr/bin/env bash
# One GPU lease, one command: install, build the CUDA extension once, check every fused op on the
# GPU, measure what the performance goals ask, write verification records — within 8 minutes on a
# bare H100/H200 (torch 2.11+cu130, triton 3.6, nvcc 13, ninja, no network).
#
#   bash scripts/gpu-check.sh           # on the GPU machine; writes under $OUT (or ./gpu-check-out)
#   bash scripts/gpu-check.sh --plan    # anywhere: the steps, their estimates and the total
#
# Each step has its own time limit (never past the overall budget, GPU_CHECK_BUDGET_S, default 540 s)
# and writes its own file, so what finished survives a later step's failure. Files under $OUT (≤ 8):
# gpu-check.log, junit.xml, bench-lora.json, bench-adapters.json, bench-e2e.json, report.md,
# verified-<gpu>.json, summary.txt. Exit status: 0 when every step passed, else 1.
# On the lent device machine there is no .git: pass FASTADAPT_BENCH_COMMIT=<sha of the tree you sent>.
# After the run, on the dev machine: copy the bench JSON to bench/results/<gpu>/ and verified-<gpu>.json
# to fastadapt/ops/verified/ (bench/README.md, "After a GPU run").
set -uo pipefail

# name | estimate (s) | limit (s) | what
STEPS=(
  "install|20|90|pip install --no-deps -e . (no CUDA build: that is the next step)"
  "build|90|240|build the CUDA extension once, for this GPU's arch, into a fixed cache dir"
  "correctness|120|210|GPU tests: every fused op vs float64 (tests/gpu/test_fused_ops_gpu.py), the CUDA kernels, the Triton kernels' and ops' GPU tests; autotune off"
  "bench-lora|170|260|LoRA linear fwd+bwd at M=8192 r=16 p=0/0.1 on 3 shapes, every variant, PEFT, addmm; decode M=1/16 forward; DoRA at 4096²"
  "bench-adapters|25|90|series/parallel adapters at d=4096 b=256 M=8192 (fused vs eager); merge bandwidth"
  "bench-e2e|45|120|one LLaMA-7B-width training step (2 layers): fastadapt vs frozen vs PEFT, tokens/s, peak memory"
  "records|5|30|verification records from this run (scripts/gpu_records.py) and report.md"
)
OPTIONAL="sanitizer: compute-sanitizer on the CUDA kernels, only if ≥ 90 s of the budget is left (not in the total)"

if [[ "${1:-}" == "--plan" ]]; then
  total=0
  printf '%-15s %8s %8s  %s\n' step est_s limit_s what
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name est limit what <<<"$s"
    printf '%-15s %8s %8s  %s\n' "$name" "$est" "$limit" "$what"
    total=$((total + est))
  done
  echo "(optional) $OPTIONAL"
  echo "total: $total s"
  exit 0
elif [[ $# -gt 0 ]]; then
  echo "usage: bash scripts/gpu-check.sh [--plan]" >&2
  exit 2
fi

cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
PY=${PYTHON:-python}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA device visible to torch: this script is for the GPU machine (--plan runs anywhere)" >&2
  exit 1
fi
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
: >"$LOG"
BUDGET=${GPU_CHECK_BUDGET_S:-540}
START=$SECONDS

export TRITON_INTERPRET=0 FASTADAPT_AUTOTUNE=0 FASTADAPT_REQUIRE_CUDA_EXT=1
# no committed record may steer a LoRA variant while this run measures them (the records step
# points FASTADAPT_VERIFIED at the records it writes)
FASTADAPT_VERIFIED=$(mktemp -d)
export FASTADAPT_VERIFIED
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# one cache for the extension, shared by every step, the tests (conftest) and their subprocesses
export FASTADAPT_CACHE_DIR=${FASTADAPT_CACHE_DIR:-/tmp/fastadapt-gpu-check-cache}
export FASTADAPT_TEST_CACHE=$FASTADAPT_CACHE_DIR
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FASTADAPT_BENCH_E2E_LAYERS=${FASTADAPT_BENCH_E2E_LAYERS:-2} FASTADAPT_BENCH_E2E_STEPS=${FASTADAPT_BENCH_E2E_STEPS:-3}
export FASTADAPT_BENCH_ROUNDS=${FASTADAPT_BENCH_ROUNDS:-3}
if [[ -z "${FASTADAPT_BENCH_COMMIT:-}" ]]; then
  FASTADAPT_BENCH_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  export FASTADAPT_BENCH_COMMIT
fi

declare -A STATUS SECS
FAILED=0

log() { echo "[gpu-check $(( SECONDS - START ))s] $*" | tee -a "$LOG"; }

# run_step NAME CMD...: runs CMD under the step's limit (capped by what is left of the budget)
run_step() {
  local name=$1; shift
  local limit="" s n e l w
  for s in "${STEPS[@]}"; do
    IFS='|' read -r n e l w <<<"$s"
    [[ "$n" == "$name" ]] && limit=$l
  done
  local left=$(( BUDGET - (SECONDS - START) - 10 ))  # 10 s kept for the summary
  (( limit > left )) && limit=$left
  if (( limit < 5 )); then
    log "$name: SKIPPED (budget spent)"; STATUS[$name]=skipped; SECS[$name]=0; FAILED=1; return 1
  fi
  log "$name: start (limit ${limit}s): $*"
  local t0=$SECONDS rc
  # SIGINT first: pytest still writes its junit XML and benchmark JSON for what finished
  timeout -s INT --kill-after=30 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  SECS[$name]=$(( SECONDS - t0 ))
  if (( rc == 0 )); then STATUS[$name]=ok
  elif (( rc == 124 || rc == 137 )); then STATUS[$name]="TIMEOUT"; FAILED=1
  else STATUS[$name]="FAILED (exit $rc)"; FAILED=1
  fi
  log "$name: ${STATUS[$name]} in ${SECS[$name]}s"
  [[ ${STATUS[$name]} == ok ]]
}

GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0))")
ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
SLUG=$(echo "$GPU" | tr '[:upper:]' '[:lower:]' | sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/-+$//' | cut -d- -f1)
SLUG=nvidia-$SLUG
log "GPU: $GPU (arch $ARCH) -> $SLUG; out: $OUT; budget ${BUDGET}s"

# the steps that are shell functions run as `bash -c <name>` under timeout (a program, not a function)
export PY OUT SLUG ARCH
install() {
  FASTADAPT_SKIP_CUDA_BUILD=1 $PY -m pip install --no-deps --no-build-isolation -e . \
    || FASTADAPT_SKIP_CUDA_BUILD=1 $PY -m pip install --no-deps -e .
}
build() {
  # this GPU's arch only (the default list builds sm_80 and sm_90a + PTX: twice the time)
  TORCH_CUDA_ARCH_LIST=$ARCH $PY - <<'EOF'
import logging, sys
logging.basicConfig(level=logging.INFO)
from fastadapt.ops import _native
ok = _native.native_available()
print("CUDA extension:", "loaded" if ok else f"FAILED: {_native.native_load_error()}")
sys.exit(0 if ok else 1)
EOF
}

export -f install build
run_step install bash -c install
run_step build bash -c build
# the tests must find the extension built above: same cache dir, same arch list (part of its key)
export TORCH_CUDA_ARCH_LIST=$ARCH
run_step correctness $PY -m pytest -q -p no:cacheprovider -m gpu -k "not compute_sanitizer" \
  tests/gpu tests/kernels tests/ops --junitxml="$OUT/junit.xml"
# LoRA: 3 shapes; DoRA: the 4096² shape only (what it costs over LoRA and PEFT's DoRA)
LORA_SEL="((fwd_bwd and M8192 and (r16 or frozen)) or (decode and (M1- or M16-) and (p0- or frozen))) and (not test_dora_linear or K4096xN4096-)"
run_step bench-lora $PY -m pytest -q -p no:cacheprovider bench/test_bench_lora_linear.py bench/test_bench_dora_linear.py -k "$LORA_SEL" \
  --benchmark-json="$OUT/bench-lora.json"
run_step bench-adapters $PY -m pytest -q -p no:cacheprovider bench/test_bench_bottleneck_adapter.py \
  bench/test_bench_lora_merge.py -k "fwd+bwd or lora_merge and 16-" --benchmark-json="$OUT/bench-adapters.json"
run_step bench-e2e $PY -m pytest -q -p no:cacheprovider bench/test_bench_e2e.py \
  -k "llama7b and ckptoff and (frozen or fastadapt_lora or peft_default or peft_bf16)" \
  --benchmark-json="$OUT/bench-e2e.json"
records() {
  $PY scripts/gpu_records.py --junit "$OUT/junit.xml" \
    --bench "$OUT/bench-lora.json" "$OUT/bench-adapters.json" --out "$OUT/verified-$SLUG.json" || return 1
  # the records just written must turn auto on where they say (fastadapt backends reads them)
  FASTADAPT_VERIFIED="$OUT/verified-$SLUG.json" $PY -m fastadapt backends
  local measured
  measured=$(find "$OUT" -maxdepth 1 -name 'bench-*.json' -size +0 | sort)
  [[ -n "$measured" ]] || { echo "no benchmark JSON: no report.md"; return 1; }
  # shellcheck disable=SC2086  # one path per word
  $PY bench/report.py $measured --out "$OUT/report.md" --no-plots
}
export -f records
run_step records bash -c records

if (( BUDGET - (SECONDS - START) >= 90 )); then
  left=$(( BUDGET - (SECONDS - START) - 10 ))
  log "sanitizer: start (limit ${left}s)"
  timeout -s INT --kill-after=30 "$left" $PY -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_kernels.py \
    -k compute_sanitizer >>"$LOG" 2>&1 && STATUS[sanitizer]=ok || STATUS[sanitizer]="FAILED or cut short"
else
  STATUS[sanitizer]="not run (under 90 s left)"
fi

{
  echo "gpu-check on $GPU, commit $FASTADAPT_BENCH_COMMIT, $(( SECONDS - START )) s"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name _ _ _ <<<"$s"
    printf '  %-15s %-22s %5ss\n' "$name" "${STATUS[$name]:-not run}" "${SECS[$name]:-0}"
  done
  printf '  %-15s %s\n' sanitizer "${STATUS[sanitizer]}"
  echo
  grep -A 30 '^### Targets' "$OUT/report.md" 2>/dev/null | sed '/^### [^T]/,$d' | head -30
  echo
  grep -E '^gpu_records:|^  [a-z_]+ +(triton|cuda) ' "$LOG" | tail -15
} | tee "$OUT/summary.txt"
exit $FAILED
