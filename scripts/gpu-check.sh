#!/usr/bin/env bash
# One GPU lease, one command: install offline, build the CUDA extension once, check the fused ops on
# the GPU, measure what the performance goals ask, and write verification records — most valuable
# first, every step under a hard cap, the caps summing to at most 420 s (bare H100/H200, python3 with
# torch 2.11+cu130, triton 3.6, transformers 5.17, nvcc 13, ninja, pytest-xdist; no network at all).
#
#   bash scripts/gpu-check.sh --stamp        # on the dev machine, before the lease: writes gpu-check-commit.json
#   bash scripts/gpu-check.sh                # on the GPU machine: writes under $OUT (or ./gpu-check-out)
#   bash scripts/gpu-check.sh --plan         # anywhere: the steps, their caps, the total, the ops covered
#   ... --only STEP[,STEP]                   # just these steps (installing / building first when needed)
#   ... --resume[=DIR]                       # seed $OUT from DIR (default: $OUT), skip the steps that
#                                            # finished there, re-run only the unfinished tests of the rest
#   ... --sanitizer                          # also compute-sanitizer on the CUDA kernels (60 s more)
#
# Every minute leaves evidence: each test's outcome and benchmark record is streamed to
# results.jsonl the moment it finishes (scripts/gpu_check_plugin.py), a step that reaches its cap is
# stopped (SIGINT, SIGKILL after a grace) and keeps what it finished, and the records are rewritten
# after every measuring step from whatever has finished (inside that step's cap). Files under $OUT
# (7 at most): gpu-check.log, results.jsonl, bench-lora.json, bench-rest.json, bench-e2e.json,
# verified-<gpu>.json, report.md. Exit status: 0 when every step passed, 1 when some did not, 2 on
# bad usage or a missing/stale stamp, 3 when the install failed (nothing else can run).
# The commit comes from gpu-check-commit.json (untracked, not ignored: it travels with the tree; the
# device copy has no .git); the script refuses to start without it. After the run, on the dev
# machine: bench/README.md, "After a GPU run". Knobs for tests and the CPU rehearsal
# (tests/test_gpu_rehearsal.py), never for a lease: GPU_CHECK_CAPS=STEP=SECONDS[,...] overrides caps,
# GPU_CHECK_GRACE_S the SIGINT-to-SIGKILL grace (10), GPU_CHECK_XDIST the number of xdist workers.
set -uo pipefail

# name | cap (s) | records after it | what
STEPS=(
  "install|30|no|python3 -m pip install --no-index --no-deps --no-build-isolation -e . (no CUDA build), then import fastadapt.kernels from this tree and check the stamp, or stop at once"
  "build|90|no|the CUDA extension, once, for this GPU's arch only (ninja, MAX_JOBS=nproc), into the cache every later step reuses"
  "correct-lora|60|yes|GPU correctness of lora_linear, lora_linear_group, dora_linear, lora_linear_4bit: every variant, shape class and dropout vs float64, and their kernels' GPU tests (pytest-xdist)"
  "bench-lora|110|yes|LoRA goals: fwd+bwd at M=8192 r=16 p=0/0.1 on 3 shapes with every variant, PEFT default/bf16 and addmm; decode M=1/16; q/k/v and gate/up groups; DoRA at 4096x4096; last, QLoRA's 4-bit op vs its torch path (2 shapes)"
  "correct-rest|45|yes|GPU correctness of the other ops (series/parallel adapters: Triton and CUDA; lora_merge: CUDA) and the CUDA and adapter kernels' GPU tests (pytest-xdist)"
  "bench-rest|40|yes|series/parallel adapters fwd+bwd at d=4096 b=256 (fused vs eager); merge bandwidth vs the device copy"
  "e2e|20|no|one LLaMA-7B-width training step (2 layers): frozen, fastadapt LoRA, PEFT default, PEFT bf16; tokens/s, peak memory"
  "report|25|no|the records once more, fastadapt backends reading them, report.md, the summary"
)
SANITIZER_STEP="sanitizer|60|yes|compute-sanitizer (memcheck, racecheck) on the CUDA kernels"
HARD_TOTAL=420  # tests/test_gpu_check.py holds the default plan to it
REFRESH_S=12    # kept free at the end of a measuring step's cap for the records
SUMMARY_S=3     # kept free at the end of the run for the summary
GRACE_S=${GPU_CHECK_GRACE_S:-10}  # between SIGINT and SIGKILL, inside the cap

# the tests and benchmarks of each step (tests/test_gpu_check.py checks that every GPU test is in one
# correctness step, and what the benchmark selections pick)
CORRECT_LORA_FILES="tests/gpu/test_fused_ops_gpu.py tests/kernels/test_lora_linear_kernels.py tests/kernels/test_dora_linear_kernels.py tests/ops/test_lora_linear.py tests/ops/test_dora_linear.py"
CORRECT_LORA_K="lora_linear or dora_linear"
CORRECT_REST_FILES="tests/gpu/test_fused_ops_gpu.py tests/gpu/test_cuda_kernels.py tests/gpu/test_triton_adapters.py tests/kernels/test_bottleneck_adapter_kernels.py tests/ops/test_bottleneck_adapter.py"
CORRECT_REST_K="not (lora_linear or dora_linear) and not compute_sanitizer"
LORA_SEL="((fwd_bwd and M8192 and (r16 or frozen)) or (decode and (M1- or M16-) and (p0- or frozen))) and (not test_dora_linear or K4096xN4096-)"
REST_SEL="fwd+bwd or lora_merge and 16-"
E2E_SEL="llama7b and ckptoff and (frozen or fastadapt_lora or peft_default or peft_bf16)"

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}  # the GPU image's interpreter is python3 (there is no `python`)

usage() {
  sed -n '7,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

PLAN=0 STAMP=0 SANITIZER=0 ONLY="" RESUME=""
for arg in "$@"; do
  case "$arg" in
    --plan) PLAN=1 ;;
    --stamp) STAMP=1 ;;
    --sanitizer) SANITIZER=1 ;;
    --only=*) ONLY=${arg#--only=} ;;
    --resume) RESUME=__OUT__ ;;
    --resume=*) RESUME=${arg#--resume=} ;;
    --only) ONLY=__NEXT__ ;;
    *) if [[ "$ONLY" == __NEXT__ ]]; then ONLY=$arg; else echo "gpu-check: unknown argument $arg" >&2; usage; fi ;;
  esac
done
[[ "$ONLY" == __NEXT__ ]] && { echo "gpu-check: --only needs STEP[,STEP]" >&2; usage; }
(( SANITIZER )) && STEPS=("${STEPS[@]:0:${#STEPS[@]}-1}" "$SANITIZER_STEP" "${STEPS[@]: -1}")

field() {  # field NAME INDEX: one column of a step's row
  local s n
  for s in "${STEPS[@]}"; do
    IFS='|' read -r n _ <<<"$s"
    if [[ "$n" == "$1" ]]; then echo "$s" | cut -d'|' -f"$2"; return 0; fi
  done
  return 1
}
cap_of() {  # a step's cap: the table's, unless GPU_CHECK_CAPS=STEP=SECONDS[,...] overrides it (the CPU rehearsal)
  local kv
  for kv in ${GPU_CHECK_CAPS:+${GPU_CHECK_CAPS//,/ }}; do
    if [[ ${kv%%=*} == "$1" ]]; then echo "${kv#*=}"; return 0; fi
  done
  field "$1" 2
}
NAMES=()
for s in "${STEPS[@]}"; do NAMES+=("${s%%|*}"); done
if [[ -n "$ONLY" ]]; then
  for n in ${ONLY//,/ }; do
    field "$n" 1 >/dev/null || { echo "gpu-check: --only: no step '$n' (steps: ${NAMES[*]})" >&2; exit 2; }
  done
fi
selected() {  # did the command line ask for this step?
  [[ -z "$ONLY" ]] && return 0
  [[ ",$ONLY," == *",$1,"* ]]
}
needs_build() { [[ $1 == correct-rest || $1 == bench-rest || $1 == sanitizer ]]; }  # they run CUDA-backend cases
# the steps this run may take, in order: install always (quick when this tree is installed already),
# the build when a step asked for needs the extension (or when asked for), then the steps asked for
RUN=(install)
build_needed=0
for n in "${NAMES[@]}"; do needs_build "$n" && selected "$n" && build_needed=1; done
for n in "${NAMES[@]}"; do
  case "$n" in
    install) ;;
    build) if (( build_needed )) || selected build; then RUN+=(build); fi ;;
    *) if selected "$n"; then RUN+=("$n"); fi ;;
  esac
done
PLANNED=0
for n in "${RUN[@]}"; do PLANNED=$((PLANNED + $(cap_of "$n"))); done

if (( PLAN )); then
  printf '%-13s %6s  %s\n' step cap_s what
  for n in "${RUN[@]}"; do
    what=$(field "$n" 4)
    [[ $(field "$n" 3) == yes ]] && what="$what; then the records, once benchmarks exist (within the cap)"
    printf '%-13s %6s  %s\n' "$n" "$(cap_of "$n")" "$what"
  done
  echo "total: $PLANNED s (hard: the run ends within it; a step is stopped at its cap, SIGINT then SIGKILL ${GRACE_S} s later, and keeps what it finished)"
  [[ -n "${GPU_CHECK_CAPS:-}" ]] && echo "caps overridden by GPU_CHECK_CAPS=$GPU_CHECK_CAPS: not the lease's plan"
  (( SANITIZER )) || echo "not in the total: --sanitizer adds '$(echo "$SANITIZER_STEP" | cut -d'|' -f4)', capped at $(echo "$SANITIZER_STEP" | cut -d'|' -f2) s"
  "$PY" scripts/gpu_records.py covers 2>/dev/null || echo "covers: see scripts/gpu_records.py::BENCH"
  exit 0
fi

STAMP_FILE=$REPO/gpu-check-commit.json
if (( STAMP )); then
  exec "$PY" scripts/gpu_records.py stamp --out "$STAMP_FILE"
fi
if [[ ! -f "$STAMP_FILE" ]]; then
  echo "gpu-check: no gpu-check-commit.json: run \`bash scripts/gpu-check.sh --stamp\` in the checkout (with .git) before sending the tree; records must name the commit they measured" >&2
  exit 2
fi
START=$SECONDS  # the planned total counts from here: the probe and the summary are inside it
# the device and the stamp's commit, in one interpreter start
PROBE=$("$PY" - "$STAMP_FILE" <<'EOF'
import json, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu-check: no CUDA device visible to torch: this script is for the GPU machine (--plan runs anywhere)")
name = torch.cuda.get_device_name(0)
major, minor = torch.cuda.get_device_capability(0)
slug = "nvidia-" + name.lower().replace("nvidia", "").split()[0]
try:
    stamp = json.load(open(sys.argv[1]))
except ValueError:
    stamp = {}
print(f"{major}.{minor}{'a' if major == 9 else ''}|{slug}|{name}|{stamp.get('commit')}|{int(bool(stamp.get('dirty')))}"
      f"|{stamp.get('tree_digest')}")
EOF
) || exit 1
IFS='|' read -r ARCH SLUG GPU COMMIT DIRTY GPU_CHECK_TREE <<<"$PROBE"
export GPU_CHECK_TREE  # every results.jsonl line names the stamped tree; --resume and records count only this one's

OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
if [[ -n "$RESUME" && "$RESUME" != __OUT__ ]]; then
  [[ -d "$RESUME" ]] || { echo "gpu-check: --resume: no folder $RESUME" >&2; exit 2; }
  if [[ "$(cd "$RESUME" && pwd)" != "$(cd "$OUT" && pwd)" ]]; then
    cp "$RESUME"/* "$OUT"/ 2>/dev/null  # the earlier run's files: results.jsonl says what finished
    chmod u+w "$OUT"/* 2>/dev/null
  fi
fi
LOG=$OUT/gpu-check.log
RESULTS=$OUT/results.jsonl
[[ -n "$RESUME" ]] || { : >"$LOG"; : >"$RESULTS"; }
touch "$LOG" "$RESULTS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")

# the interpreter's own bin folder first (ninja, the console scripts), then ninja's if it is a package
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
NINJA_BIN=$("$PY" -c 'import ninja, sys; print(ninja.BIN_DIR)' 2>/dev/null) && PATH="$NINJA_BIN:$PATH"
export PATH
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FASTADAPT_AUTOTUNE=0 FASTADAPT_REQUIRE_CUDA_EXT=1
# no network there: never wait on a name lookup (models are built from configs, packages installed offline)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1
# no committed record may steer a LoRA variant while this run measures them
export FASTADAPT_VERIFIED=$WORK/no-records
mkdir -p "$FASTADAPT_VERIFIED"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# one cache for the extension and the Triton kernels, shared by every step, the tests and their workers
export FASTADAPT_CACHE_DIR=${FASTADAPT_CACHE_DIR:-/tmp/fastadapt-gpu-check-cache}
export FASTADAPT_TEST_CACHE=$FASTADAPT_CACHE_DIR TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/fastadapt-gpu-check-triton}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FASTADAPT_BENCH_E2E_LAYERS=${FASTADAPT_BENCH_E2E_LAYERS:-2} FASTADAPT_BENCH_E2E_STEPS=${FASTADAPT_BENCH_E2E_STEPS:-3}
export FASTADAPT_BENCH_E2E_WARMUP=${FASTADAPT_BENCH_E2E_WARMUP:-2} FASTADAPT_BENCH_ROUNDS=${FASTADAPT_BENCH_ROUNDS:-3}
export PYTHONPATH=$REPO/scripts${PYTHONPATH:+:$PYTHONPATH}  # gpu_check_plugin
XDIST_N=${GPU_CHECK_XDIST:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}  # pytest-xdist workers of the correctness steps
"$PY" -c "import xdist" 2>/dev/null || XDIST_N=0
export PY OUT WORK RESULTS REPO XDIST_N

log() { echo "[gpu-check $(( SECONDS - START ))s] $*" | tee -a "$LOG"; }

# the stamp's commit, for the benchmark JSON (records read the stamp themselves)
export FASTADAPT_BENCH_COMMIT=${COMMIT:-unknown} FASTADAPT_BENCH_DIRTY=${DIRTY:-}  # the benchmark JSON's commit
export ARCH SLUG TORCH_CUDA_ARCH_LIST=$ARCH  # the tests must find the extension the build step made (the arch is in its key)
RECORDS=$OUT/verified-$SLUG.json
export RECORDS
log "GPU: $GPU (arch $ARCH) -> $SLUG; commit $FASTADAPT_BENCH_COMMIT$([[ $DIRTY == 1 ]] && echo ' (dirty tree)'); out: $OUT; ${XDIST_N:-0} xdist workers"

# -- the steps (each a function run as `bash -c NAME` under its cap) ---------------------------------

import_check() {  # fastadapt.kernels imports from THIS tree (from outside it: not via the cwd), and the
  # tree is the stamped one (the files it lists, their digest, the kernel hashes)
  (cd / && "$PY" - "$REPO" <<'EOF'
import os, sys
import fastadapt, fastadapt.kernels
want = os.path.realpath(os.path.join(sys.argv[1], "kernels", "fastadapt_kernels"))
got = os.path.realpath(fastadapt.kernels.__path__[0])
if got != want:
    sys.exit(f"fastadapt.kernels comes from {got}, not from this tree ({want})")
sys.path.insert(0, os.path.join(sys.argv[1], "scripts"))
import gpu_records
try:
    stamp = gpu_records.read_stamp(gpu_records.STAMP)
except ValueError as exc:
    sys.exit(f"gpu-check: {exc}")
print(f"fastadapt.kernels imports from {got}; stamp: commit {stamp['commit']}, kernel hashes match")
EOF
  )
}
install() {
  if import_check 2>/dev/null; then
    echo "fastadapt is installed from this tree already: no install"
  else
    # offline: no index, no isolated build env (it would fetch setuptools), no CUDA build (the next step)
    FASTADAPT_SKIP_CUDA_BUILD=1 "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir \
      --disable-pip-version-check -e . || return 1
    import_check
  fi
}
build() {
  command -v ninja >/dev/null || { echo "ninja is not on PATH ($PATH)"; return 1; }
  "$PY" - <<'EOF'
import logging, sys
logging.basicConfig(level=logging.INFO)
from fastadapt.ops import _native
ok = _native.native_available()
print("CUDA extension:", "loaded" if ok else f"FAILED: {_native.native_load_error()}")
sys.exit(0 if ok else 1)
EOF
}
pytest_step() {  # pytest_step STEP ARGS...: the plugin streams each finished test to results.jsonl
  local step=$1; shift
  "$PY" -m pytest -q -p no:cacheprovider -p gpu_check_plugin --continue-on-collection-errors \
    --gpu-check-results "$RESULTS" --gpu-check-step "$step" ${GPU_CHECK_SKIP_DONE:+--gpu-check-skip-done} "$@"
  local rc=$?
  (( rc == 5 )) && return 0  # nothing left to run (every test finished in an earlier run)
  return $rc
}
xdist() { (( XDIST_N > 1 )) && echo "-n $XDIST_N --dist load"; }
# shellcheck disable=SC2046,SC2086  # word splitting of the file lists and xdist's flags is meant
correct_lora() { pytest_step correct-lora $(xdist) -m gpu $CORRECT_LORA_FILES -k "$CORRECT_LORA_K"; }
# shellcheck disable=SC2046,SC2086
correct_rest() { pytest_step correct-rest $(xdist) -m gpu $CORRECT_REST_FILES -k "$CORRECT_REST_K"; }
bench_lora() {
  # the 4-bit op last: the LoRA goals come first if the cap cuts the step short
  pytest_step bench-lora bench/test_bench_lora_linear.py bench/test_bench_dora_linear.py bench/test_bench_lora_linear_4bit.py \
    -k "$LORA_SEL" \
    --benchmark-json="$WORK/bench-lora.json"
}
bench_rest() {
  pytest_step bench-rest bench/test_bench_bottleneck_adapter.py bench/test_bench_lora_merge.py -k "$REST_SEL" \
    --benchmark-json="$WORK/bench-rest.json"
}
e2e() { pytest_step e2e bench/test_bench_e2e.py -k "$E2E_SEL" --benchmark-json="$WORK/bench-e2e.json"; }
sanitizer() { pytest_step sanitizer tests/gpu/test_cuda_kernels.py -m gpu -k compute_sanitizer; }
records() {
  "$PY" scripts/gpu_records.py records --results "$RESULTS" --out "$RECORDS"
}
report() {
  records || return 1
  # the records just written must steer auto where they say (fastadapt backends reads them)
  FASTADAPT_VERIFIED=$RECORDS "$PY" -m fastadapt backends || return 1
  local measured
  measured=$(find "$OUT" -maxdepth 1 -name 'bench-*.json' -size +0 | sort)
  [[ -n "$measured" ]] || { echo "no benchmark JSON: no report.md"; return 1; }
  # shellcheck disable=SC2086  # one path per word
  "$PY" bench/report.py $measured --out "$OUT/report.md" --no-plots
}
export CORRECT_LORA_FILES CORRECT_LORA_K CORRECT_REST_FILES CORRECT_REST_K LORA_SEL REST_SEL E2E_SEL
export -f import_check install build pytest_step xdist correct_lora correct_rest bench_lora bench_rest e2e \
  sanitizer records report

# -- running them ----------------------------------------------------------------------------------------

declare -A STATUS SECS CPU
FAILED=0
child_cpu() {  # CPU seconds (user + system) of this shell's finished children so far, into CPU_NOW
  times >"$WORK/times"  # the builtin, in this shell: a subshell (a pipe, $(...)) has no children of its own
  CPU_NOW=$(awk 'END { split($1, u, "m"); split($2, s, "m"); printf "%d", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$WORK/times")
}

status_line() {  # results.jsonl: what --resume reads
  printf '{"event": "step", "step": "%s", "status": "%s", "seconds": %s, "tree": "%s"}\n' "$1" "$2" "$3" \
    "$GPU_CHECK_TREE" >>"$RESULTS"
}
finished_ok() {  # did an earlier run (in results.jsonl) finish this step?
  "$PY" - "$RESULTS" "$1" <<'EOF'
import json, os, sys
last = None
for line in open(sys.argv[1]):
    try:
        row = json.loads(line)
    except ValueError:
        continue
    if row.get("event") == "step" and row.get("step") == sys.argv[2] and row.get("tree") == os.environ["GPU_CHECK_TREE"]:
        last = row.get("status")
sys.exit(0 if last == "ok" else 1)
EOF
}
has_bench() { grep -q '"bench": {' "$RESULTS" 2>/dev/null; }

# run_step NAME: the step's function under its cap (never past the run's planned total), then the
# bench JSON merged and the records rewritten inside the same cap
run_step() {
  local name=$1 fn=${1//-/_}
  local cap; cap=$(cap_of "$name")
  local left=$(( PLANNED - (SECONDS - START) - SUMMARY_S ))  # the last step gives up the probe's time
  (( cap > left )) && cap=$left
  local deadline=$(( SECONDS + cap )) reserve=0
  if [[ $(field "$name" 3) == yes ]] && { [[ $name == bench-* ]] || has_bench; }; then reserve=$REFRESH_S; fi
  local limit=$(( cap - reserve - GRACE_S ))
  if (( limit < 5 )); then
    log "$name: SKIPPED (no time left in the plan)"; STATUS[$name]=skipped; SECS[$name]=0; FAILED=1
    status_line "$name" skipped 0; return 1
  fi
  log "$name: start (cap ${cap}s: SIGINT at ${limit}s, SIGKILL ${GRACE_S}s later$( (( reserve )) && echo ', then the records'))"
  local t0=$SECONDS rc cpu0
  child_cpu; cpu0=$CPU_NOW
  timeout -s INT -k "$GRACE_S" "$limit" bash -c "$fn" >>"$LOG" 2>&1
  rc=$?
  SECS[$name]=$(( SECONDS - t0 ))
  child_cpu; CPU[$name]=$(( CPU_NOW - cpu0 ))
  [[ -n "$(tail -c1 "$LOG")" ]] && echo >>"$LOG"  # pytest's progress line may lack its newline
  if (( rc == 0 )); then STATUS[$name]=ok
  elif (( rc == 124 || rc == 137 )); then STATUS[$name]="stopped at cap"; FAILED=1
  else STATUS[$name]="FAILED (exit $rc)"; FAILED=1
  fi
  status_line "$name" "$([[ ${STATUS[$name]} == ok ]] && echo ok || echo "${STATUS[$name]}")" "${SECS[$name]}"
  log "$name: ${STATUS[$name]} in ${SECS[$name]}s (${CPU[$name]} s of CPU)"
  if [[ $name == bench-* || $name == e2e ]]; then
    "$PY" scripts/gpu_check.py merge-bench --step "$name" --results "$RESULTS" --pytest-json "$WORK/$name.json" \
      --out "$OUT/bench-${name#bench-}.json" >>"$LOG" 2>&1 || log "$name: merging the benchmark JSON FAILED"
  fi
  if (( reserve )) && has_bench; then
    local t=$(( deadline - SECONDS ))
    (( t < 3 )) && t=3
    timeout -s INT -k 2 "$t" bash -c records 2>&1 | tee -a "$LOG" | grep -E '^gpu_records: [0-9]+ records' \
      || log "$name: records not rewritten (see the log)"
  fi
  [[ ${STATUS[$name]} == ok ]]
}

summary() {
  {
    echo
    echo "gpu-check on $GPU, commit $FASTADAPT_BENCH_COMMIT$([[ $DIRTY == 1 ]] && echo ' (dirty)'), $(( SECONDS - START )) s of $PLANNED planned"
    for n in "${RUN[@]}"; do
      printf '  %-13s %-26s %4ss of %ss\n' "$n" "${STATUS[$n]:-not run}" "${SECS[$n]:-0}" "$(cap_of "$n")"
    done
    "$PY" scripts/gpu_check.py show-records "$RECORDS"
    # why the others are missing: the last records run's blocked ops
    tac "$LOG" | awk '/^gpu_records: [0-9]+ test results/ { exit } /blocked by|does not say|no record:/' | tac | cut -c1-200
    echo
    grep -A 30 '^### Targets' "$OUT/report.md" 2>/dev/null | sed '/^### [^T]/,$d' | head -30
    echo "files: $(cd "$OUT" && ls | tr '\n' ' ')"
  } | tee -a "$LOG"
}

# --resume: a step an earlier run finished is not run again (nor the build, when no step left needs it);
# the others run only their unfinished tests
if [[ -n "$RESUME" ]]; then
  export GPU_CHECK_SKIP_DONE=1
  build_needed=0
  for n in "${RUN[@]}"; do needs_build "$n" && ! finished_ok "$n" && build_needed=1; done
fi
for n in "${RUN[@]}"; do
  if [[ -n "$RESUME" && $n != install ]]; then
    if [[ $n == build ]] && ! (( build_needed )) && ! selected build; then
      log "build: no step left needs the CUDA extension: skipped"; STATUS[$n]="not needed"; continue
    elif [[ $n != build ]] && finished_ok "$n"; then
      log "$n: finished in an earlier run (results.jsonl): skipped"; STATUS[$n]="ok (earlier run)"; continue
    fi
  fi
  if ! run_step "$n"; then
    if [[ $n == install ]]; then
      log "install failed: fastadapt.kernels does not import from this tree, or the stamp is stale: stopping"
      summary; rm -rf "$WORK"; exit 3
    elif [[ $n == build ]]; then
      # no step may try again: a build killed at its cap leaves torch's build lock behind, and a JIT
      # build in every xdist worker would spend their caps; the CUDA cases fail at once instead
      export FASTADAPT_JIT_BUILD=0
      log "build: the later steps will not build the CUDA extension (its cases fail; Triton's are unaffected)"
    fi
  fi
done
summary
rm -rf "$WORK"
exit $FAILED
