#!/usr/bin/env bash
# GPU check of mixsga's CUDA kernels, for a machine with a GPU and no network (about 5-8 minutes on
# one H200 with 16 cores; every step has a timeout and the whole run a budget of 540 s).
#
#   scripts/gpu_check.sh                configure with MIXSGA_WITH_CUDA=ON into a fresh build folder,
#                                       build with all cores, check that the library carries PTX, run
#                                       the *_CUDA gtests, the rest of the gtest suite, the CUDA cases
#                                       of the pytest suite, the CUDA gtests of the decode and RoPE
#                                       kernels under compute-sanitizer (if installed), then the CUDA
#                                       benchmarks (bench_decode, bench_layer) and compare.py on CUDA.
#   scripts/gpu_check.sh --stage-deps   (on a machine with the Debian packages, e.g. the CPU dev box)
#                                       copy GoogleTest and Google Benchmark into .gpu_deps/ (ignored
#                                       by git) so that a GPU machine without them can build the tests:
#                                       carry .gpu_deps along with the working tree.
#
# Results (at most 8 files, one folder) go to $OUT if set, else out/gpu_check:
#   summary.txt      one line per step with its status and seconds; the last line is the verdict
#   environment.txt  nvidia-smi, nvcc, python/torch versions
#   build.log        configure + build output, then cuobjdump --list-ptx of the library
#   tests_cuda.log   the *_CUDA gtests (tests_cuda.xml: their JUnit report)
#   tests_rest.log   every other gtest, then the CUDA cases of the pytest suite (if the Python package
#                    could be built there)
#   sanitizer.log    compute-sanitizer memcheck of the decode / RoPE CUDA gtests
#   benchmarks.log   CUDA benchmarks (Google Benchmark console output), then compare.py --device cuda
#
# Environment: MIXSGA_PYTHON (interpreter whose torch to build against; default: .venv/bin/python if
# its torch has CUDA, else python3), MIXSGA_GPU_BUILD (build folder, default out/build-gpu-check),
# TORCH_CUDA_ARCH_LIST (default: the GPU's compute capability), MIXSGA_GPU_DEPS (default .gpu_deps),
# MIXSGA_GPU_CHECK_BUDGET (seconds, default 540).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEPS="${MIXSGA_GPU_DEPS:-$ROOT/.gpu_deps}"

if [[ "${1:-}" == "--stage-deps" ]]; then
  rm -rf "$DEPS"
  mkdir -p "$DEPS"
  staged=0
  for pkg in libgtest-dev libgmock-dev googletest libbenchmark-dev libbenchmark1debian libbenchmark1; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || continue
    while IFS= read -r path; do
      [[ -f "$path" || -L "$path" ]] || continue
      case "$path" in /usr/share/doc/*|/usr/share/man/*) continue ;; esac
      mkdir -p "$DEPS$(dirname "$path")"
      cp -a "$path" "$DEPS$path"
    done < <(dpkg -L "$pkg")
    staged=$((staged + 1))
  done
  if git rev-parse --git-dir > /dev/null 2>&1; then
    exclude="$(git rev-parse --git-path info/exclude)"
    rel="/${DEPS#"$ROOT"/}/"
    grep -qxF "$rel" "$exclude" 2>/dev/null || echo "$rel" >> "$exclude"
  fi
  echo "[gpu_check] staged $staged Debian packages into $DEPS ($(du -sh "$DEPS" | cut -f1)); carry it to the GPU machine"
  exit 0
fi

RESULTS="${OUT:-$ROOT/out/gpu_check}"
BUILD="${MIXSGA_GPU_BUILD:-$ROOT/out/build-gpu-check}"
BUDGET="${MIXSGA_GPU_CHECK_BUDGET:-540}"
JOBS="$(nproc)"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"
failures=0
incomplete=0

note() { echo "[gpu_check] $*"; }
left() { echo $((BUDGET - SECONDS)); }
# step NAME TIMEOUT LOG COMMAND...: runs COMMAND with a timeout (capped by what is left of the budget),
# appending its output to LOG and its status to the summary.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local remaining
  remaining="$(left)"
  if ((remaining < 10)); then
    echo "$name: SKIPPED (budget of ${BUDGET}s spent)" >> "$SUMMARY"
    note "$name: skipped, budget spent"
    incomplete=$((incomplete + 1))
    return 1
  fi
  ((limit > remaining)) && limit="$remaining"
  local start=$SECONDS rc
  note "$name (timeout ${limit}s) -> $(basename "$log")"
  echo "===== $name: $*" >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local took=$((SECONDS - start))
  if ((rc == 0)); then
    echo "$name: OK (${took}s)" >> "$SUMMARY"
  elif ((rc == 124 || rc == 137)); then
    echo "$name: TIMEOUT after ${took}s" >> "$SUMMARY"
    failures=$((failures + 1))
  else
    echo "$name: FAILED rc=$rc (${took}s)" >> "$SUMMARY"
    failures=$((failures + 1))
  fi
  note "$name: rc=$rc in ${took}s"
  return "$rc"
}

# ---- interpreter with a CUDA torch ------------------------------------------------------------------
torch_has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" > /dev/null 2>&1; }
PY="${MIXSGA_PYTHON:-}"
if [[ -z "$PY" ]]; then
  for candidate in "$ROOT/.venv/bin/python" python3 python; do
    if command -v "$candidate" > /dev/null 2>&1 && torch_has_cuda "$candidate"; then
      PY="$(command -v "$candidate")"
      break
    fi
  done
fi
if [[ -z "$PY" ]] || ! torch_has_cuda "$PY"; then
  echo "python: FAILED no interpreter with a CUDA build of torch (set MIXSGA_PYTHON)" >> "$SUMMARY"
  echo "VERDICT: FAIL" >> "$SUMMARY"
  cat "$SUMMARY"
  exit 1
fi

# ---- environment ------------------------------------------------------------------------------------
ENVIRONMENT="$RESULTS/environment.txt"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -a)"
  echo "cores: $JOBS"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "python: $PY"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')" 2>&1
  command -v nvcc > /dev/null && nvcc --version | tail -2
  command -v nvidia-smi > /dev/null && timeout 30 nvidia-smi
} > "$ENVIRONMENT" 2>&1
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  cap="$(timeout 30 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')"
  export TORCH_CUDA_ARCH_LIST="${cap:-9.0}"
fi
echo "TORCH_CUDA_ARCH_LIST: $TORCH_CUDA_ARCH_LIST" >> "$ENVIRONMENT"
note "python $PY, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, $JOBS cores, results in $RESULTS"

# ---- configure and build -----------------------------------------------------------------------------
BUILD_LOG="$RESULTS/build.log"
: > "$BUILD_LOG"
rm -rf "$BUILD"
generator=()
command -v ninja > /dev/null 2>&1 && generator=(-G Ninja)
prefix_path=""
[[ -d "$DEPS/usr" ]] && prefix_path="$DEPS/usr"
configure_args=(-S "$ROOT" -B "$BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMIXSGA_PYTHON="$PY"
  -DMIXSGA_WITH_CUDA=ON -DMIXSGA_BUILD_EXAMPLES=OFF -DCMAKE_PREFIX_PATH="$prefix_path")
# The Python package too (its pytest suite has CUDA cases), where pytest and Python's headers are there.
python_ok=OFF
"$PY" -c "import os, sysconfig, pytest; assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" \
  > /dev/null 2>&1 && python_ok=ON
# Richest configuration first; a machine without the Python headers, Google Benchmark or GoogleTest
# (stage the last two with --stage-deps) falls back to less, down to proving that the kernels build.
attempts=(
  "-DMIXSGA_BUILD_PYTHON=$python_ok -DMIXSGA_BUILD_BENCHMARKS=ON -DMIXSGA_BUILD_TESTS=ON"
  "-DMIXSGA_BUILD_PYTHON=OFF -DMIXSGA_BUILD_BENCHMARKS=ON -DMIXSGA_BUILD_TESTS=ON"
  "-DMIXSGA_BUILD_PYTHON=OFF -DMIXSGA_BUILD_BENCHMARKS=OFF -DMIXSGA_BUILD_TESTS=ON"
  "-DMIXSGA_BUILD_PYTHON=OFF -DMIXSGA_BUILD_BENCHMARKS=OFF -DMIXSGA_BUILD_TESTS=OFF"
)
configured=""
tried=""
for attempt in "${attempts[@]}"; do
  [[ "$attempt" == "$tried" ]] && continue  # the first two agree where the Python package is off anyway
  tried="$attempt"
  rm -rf "$BUILD"
  read -r -a extra <<< "$attempt"
  echo "===== configure with $attempt" >> "$BUILD_LOG"
  if timeout 120 cmake "${configure_args[@]}" "${extra[@]}" >> "$BUILD_LOG" 2>&1; then
    configured="$attempt"
    break
  fi
done
if [[ -z "$configured" ]]; then
  echo "configure: FAILED (see build.log)" >> "$SUMMARY"
  failures=$((failures + 1))
else
  echo "configure: OK ($configured)" >> "$SUMMARY"
fi
tests_built=0
[[ "$configured" == *"BUILD_TESTS=ON"* ]] && tests_built=1
python_built=0
[[ "$configured" == *"BUILD_PYTHON=ON"* ]] && python_built=1
step build 330 "$BUILD_LOG" cmake --build "$BUILD" -j "$JOBS"
built=$?

# ---- PTX in the fatbin (forward compatibility: a newer GPU JIT-compiles it) ------------------------------
LIB="$(ls "$BUILD"/libmixsga.so 2>/dev/null | head -1)"
if ((built == 0)) && [[ -n "$LIB" ]] && command -v cuobjdump > /dev/null 2>&1; then
  echo "===== cuobjdump --list-ptx $LIB" >> "$BUILD_LOG"
  ptx_list="$(timeout 60 cuobjdump --list-ptx "$LIB" 2>&1)"
  echo "$ptx_list" >> "$BUILD_LOG"
  if grep -q '\.ptx' <<< "$ptx_list"; then
    echo "ptx: OK ($(grep -o 'sm_[0-9a-z]*\.ptx' <<< "$ptx_list" | sort -u | tr '\n' ' '))" >> "$SUMMARY"
  else
    echo "ptx: FAILED (no PTX in $LIB; see build.log)" >> "$SUMMARY"
    failures=$((failures + 1))
  fi
else
  echo "ptx: NOT CHECKED (built=$built, cuobjdump $(command -v cuobjdump > /dev/null 2>&1 && echo found || echo missing))" >> "$SUMMARY"
fi

# ---- tests --------------------------------------------------------------------------------------------
TESTS="$BUILD/tests/cpp/mixsga_tests"
export OMP_NUM_THREADS="$JOBS"
if ((built == 0 && tests_built == 1)) && [[ -x "$TESTS" ]]; then
  step tests-cuda 120 "$RESULTS/tests_cuda.log" "$TESTS" --gtest_filter='*_CUDA:CudaRegistration.*' \
    --gtest_output="xml:$RESULTS/tests_cuda.xml"
  grep -E "^\[  (PASSED|FAILED|SKIPPED) *\]" "$RESULTS/tests_cuda.log" | sed 's/^/  tests-cuda /' >> "$SUMMARY"
  step tests-rest 120 "$RESULTS/tests_rest.log" "$TESTS" --gtest_filter='-*_CUDA:CudaRegistration.*'
  grep -E "^\[  (PASSED|FAILED) *\]" "$RESULTS/tests_rest.log" | sed 's/^/  tests-rest /' >> "$SUMMARY"
else
  echo "tests: NOT RUN (built=$built, tests configured=$tests_built)" >> "$SUMMARY"
  failures=$((failures + 1))
fi
if ((built == 0 && python_built == 1)); then
  # The CUDA cases of the pytest suite (DEVICES = cpu, cuda), against the package staged in the build.
  step pytest-cuda 90 "$RESULTS/tests_rest.log" env PYTHONPATH="$BUILD/python" PYTHONDONTWRITEBYTECODE=1 \
    "$PY" -m pytest "$ROOT/tests/python" -q -x -k cuda -p no:cacheprovider
else
  echo "pytest-cuda: NOT RUN (Python package not built here)" >> "$SUMMARY"
fi

# ---- compute-sanitizer: out-of-bounds / uninitialised reads in the decode and RoPE kernels --------------
SANITIZER="$(command -v compute-sanitizer 2>/dev/null || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
if [[ -n "$SANITIZER" ]] && ((built == 0 && tests_built == 1)) && [[ -x "$TESTS" ]]; then
  step sanitizer 120 "$RESULTS/sanitizer.log" "$SANITIZER" --tool memcheck --error-exitcode 3 "$TESTS" \
    --gtest_filter='*HeteroDecodeAttention*_CUDA:*RopeRotate*_CUDA' || true
else
  echo "sanitizer: NOT RUN (compute-sanitizer ${SANITIZER:-not found}, built=$built)" >> "$SUMMARY"
fi

# ---- benchmarks: the CUDA ones of every benchmark binary that was built --------------------------------
BENCH_LOG="$RESULTS/benchmarks.log"
benches=()
if [[ -d "$BUILD/benchmarks" ]]; then
  for bin in "$BUILD"/benchmarks/*; do
    [[ -f "$bin" && -x "$bin" ]] && benches+=("$bin")
  done
fi
if ((${#benches[@]} == 0)); then
  echo "benchmarks: none built" >> "$SUMMARY"
fi
for bin in "${benches[@]}"; do
  name="$(basename "$bin")"
  [[ "$name" == *.* ]] && continue  # not a benchmark binary (a script or data file)
  cuda_filter='[Cc][Uu][Dd][Aa]'
  if [[ "$name" =~ $cuda_filter ]]; then
    step "bench-$name" 60 "$BENCH_LOG" "$bin" || true
  elif timeout 30 "$bin" --benchmark_list_tests=true 2>/dev/null | grep -qiE "cuda"; then
    step "bench-$name" 60 "$BENCH_LOG" "$bin" --benchmark_filter="$cuda_filter" || true
  else
    echo "bench-$name: no CUDA benchmarks listed" >> "$SUMMARY"
  fi
done

# compare.py: the layer against the naive implementation and static GQA, every arm on the GPU.
if ((built == 0 && python_built == 1)); then
  step compare-cuda 90 "$BENCH_LOG" env PYTHONPATH="$BUILD/python" PYTHONDONTWRITEBYTECODE=1 \
    "$PY" "$ROOT/benchmarks/compare.py" --quick --device cuda --out "$BUILD/compare_cuda.md" || true
  [[ -f "$BUILD/compare_cuda.md" ]] && cat "$BUILD/compare_cuda.md" >> "$BENCH_LOG"
else
  echo "compare-cuda: NOT RUN (Python package not built here)" >> "$SUMMARY"
fi

if ((failures == 0 && incomplete > 0)); then
  echo "VERDICT: PASS SO FAR, $incomplete step(s) skipped for time (${SECONDS}s)" >> "$SUMMARY"
elif ((failures == 0)); then
  echo "VERDICT: PASS (${SECONDS}s)" >> "$SUMMARY"
else
  echo "VERDICT: FAIL, $failures step(s) failed (${SECONDS}s)" >> "$SUMMARY"
fi
cat "$SUMMARY"
((failures == 0))
