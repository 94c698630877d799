#!/usr/bin/env bash
# Compile check of the hand-written CUDA sources, for machines without a GPU or a CUDA torch.
#
# Runs this machine's nvcc on every csrc/**/*.cu (C++17, compile only, for every target and with the
# flags of a real build: fastadapt/_cuda_build.py) and the host compiler on every csrc/**/*.cpp,
# against the installed torch's headers. Fails on any error;
# prints the time per file and in total. Nothing is linked or run.
#
#   .ci/check_csrc.sh                 # all files, in parallel (JOBS, default: nproc)
#   PTXAS_VERBOSE=1 .ci/check_csrc.sh # also print registers / spills per kernel
#   NVCC=/path/to/nvcc CXX=g++ ...    # other compilers
#
# A CPU torch wheel ships the c10/cuda headers but not the CMake-generated
# c10/cuda/impl/cuda_cmake_macros.h. torch's own switch C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips
# that include; the one macro it would define (C10_CUDA_BUILD_SHARED_LIBS) only matters on
# Windows. This define is used here only, never in a real build.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-nvcc}"
CXX="${CXX:-c++}"
JOBS="${JOBS:-$(nproc)}"
PYTHON="${PYTHON:-python}"

command -v "$NVCC" >/dev/null || { echo "check_csrc: nvcc not found (set NVCC)" >&2; exit 1; }
TORCH_INC=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
PY_INC=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
OUT_DIR=$(mktemp -d /tmp/fastadapt_csrc.XXXXXX)
trap 'rm -rf "$OUT_DIR"' EXIT

# torch's headers warn under C++17 (default bit-field initialisers are C++20); the code here
# stays C++17 so it also builds against torch 2.5-2.9, whose extensions compile as C++17.
read -r -a ARCH <<<"$("$PYTHON" fastadapt/_cuda_build.py arch)"
read -r -a BUILD_NVCC <<<"$("$PYTHON" fastadapt/_cuda_build.py nvcc)"
read -r -a BUILD_CXX <<<"$("$PYTHON" fastadapt/_cuda_build.py cxx)"
COMMON=(-std=c++17 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Icsrc $TORCH_INC "-I$PY_INC")
NVCC_FLAGS=("${ARCH[@]}" "${BUILD_NVCC[@]}" "${COMMON[@]}" -diag-suppress 3306 -Xcompiler -Wno-c++20-extensions)
[[ "${PTXAS_VERBOSE:-0}" == "1" ]] && NVCC_FLAGS+=(-Xptxas -v)
CXX_FLAGS=("${BUILD_CXX[@]}" "${COMMON[@]}" -fPIC -Wall -Wno-c++20-extensions -Wno-unused-parameter)

mapfile -t CU < <(find csrc -name '*.cu' | sort)
mapfile -t CPP < <(find csrc -name '*.cpp' | sort)
[[ ${#CU[@]} -gt 0 ]] || { echo "check_csrc: no csrc/**/*.cu found" >&2; exit 1; }

compile_one() {  # $1 = source; writes $OUT_DIR/<name>.{o,log,time,rc}
  local src="$1" tag start rc
  tag=$(echo "$src" | tr '/' '_')
  start=$(date +%s.%N)
  if [[ "$src" == *.cu ]]; then
    "$NVCC" "${NVCC_FLAGS[@]}" -c "$src" -o "$OUT_DIR/$tag.o" >"$OUT_DIR/$tag.log" 2>&1 && rc=0 || rc=$?
  else
    "$CXX" "${CXX_FLAGS[@]}" -c "$src" -o "$OUT_DIR/$tag.o" >"$OUT_DIR/$tag.log" 2>&1 && rc=0 || rc=$?
  fi
  echo "$rc" >"$OUT_DIR/$tag.rc"
  awk -v a="$(date +%s.%N)" -v b="$start" 'BEGIN { print a - b }' >"$OUT_DIR/$tag.time"
}

t0=$(date +%s.%N)
running=0
for src in "${CU[@]}" "${CPP[@]}"; do
  compile_one "$src" &
  running=$((running + 1))
  if (( running >= JOBS )); then wait -n || true; running=$((running - 1)); fi
done
wait || true
t1=$(date +%s.%N)

fail=0
for src in "${CU[@]}" "${CPP[@]}"; do
  tag=$(echo "$src" | tr '/' '_')
  rc=$(cat "$OUT_DIR/$tag.rc" 2>/dev/null || echo 1)
  secs=$(printf '%.1f' "$(cat "$OUT_DIR/$tag.time" 2>/dev/null || echo 0)")
  if [[ "$rc" != "0" ]]; then
    echo "FAIL  ${secs}s  $src"
    cat "$OUT_DIR/$tag.log"
    fail=1
  else
    echo "ok    ${secs}s  $src"
    # Show diagnostics that point into our own sources (torch's header warnings are noise here).
    grep -E '(^|/)csrc/[^ ]+(\(|:)[0-9]+' "$OUT_DIR/$tag.log" | grep -v '^In file included' || true
    [[ "${PTXAS_VERBOSE:-0}" == "1" ]] && grep -E 'ptxas info|spill' "$OUT_DIR/$tag.log" || true
  fi
done
printf 'check_csrc: %d files, %.1fs wall (%s jobs)\n' $(( ${#CU[@]} + ${#CPP[@]} )) \
  "$(awk -v a="$t1" -v b="$t0" 'BEGIN { print a - b }')" "$JOBS"
exit "$fail"
