#!/usr/bin/env bash
# The GPU session: one device call of at most 9 minutes (AMFLOW_SESSION_SECONDS, default 540)
# that builds, checks and measures both GPU backends on the installed package. Stages, in order,
# each under its own timeout (capped by the time left), its log written to $OUT as it runs:
#   build     pip install the extension for this GPU's arch only, MAX_JOBS = cores
#   check     python3 -m amflow_kernels --require cuda
#   smoke     the GPU smoke grid (pytest -m smoke): both fused GPU backends × fp16/bf16/fp32 × forward
#             and backward, on every core (pytest-xdist), one config per autotune key
#             (AMFLOW_AUTOTUNE=first), stopping at the first failure
#   sanitize  compute-sanitizer memcheck, racecheck and initcheck on a tiny case of every CUDA kernel
#   bench     the ops at the five ViT shapes, bf16, forward and forward+backward, beside SDPA,
#             the eager reference, torch.compile and flash-colreduce (where carried), and the
#             AM flow model's steps (bench_models.py); one config per autotune key
#             (AMFLOW_AUTOTUNE=first: the ops took 147 s on the H200; timing every config took
#             over 240 s), AMFLOW_BENCH_AUTOTUNE=time for a call of its own
#   full      with the time left, the rest of the GPU grids (-m 'gpu and not smoke')
# Tests run from outside the checkout, so they import the installed package (a source tree on
# sys.path would shadow it and its extension: every cuda case would skip). A stage cut off at
# its limit gets SIGINT first, so pytest still prints which tests failed. AMFLOW_REVISION names
# the tree in the logs and the bench record (the device's copy of .git may be stale). What comes back,
# within the device's 8 files: session.log (versions, each stage's status and time), build.log,
# check.log, tests.log (smoke, then full), sanitize.log, bench.log and the bench results.
#
#   bench/gpu_session.sh [--dry-run] [STAGE ...]
#
# --dry-run rehearses it on a machine without a GPU (PYTHON: the interpreter of an environment
# like the GPU machine's, see docs/testing.md): the CPU extension is built, the check requires the
# cpu backend, the smoke grid runs through Triton's interpreter (AMFLOW_GPU_GRIDS_ON_CPU) and
# prints how many compilations it would trigger, the sanitizer cases run on the cpu backend
# without compute-sanitizer, the benchmarks' GPU cases are collected and skip, the full grid is
# only collected; no session limit applies.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
stages="${*:-build check smoke sanitize bench full}"
py="${PYTHON:-python3}"
out="${OUT:-$repo/bench/results/session}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
cores="$(nproc)"
session_seconds="${AMFLOW_SESSION_SECONDS:-540}"
deadline=$(( $(date +%s) + session_seconds ))
log="$out/session.log"

say() { echo "$*" | tee -a "$log"; }
left() { if [ "$dry_run" = 1 ]; then echo 100000; else echo $(( deadline - $(date +%s) )); fi; }

# run STAGE CAP LOGFILE COMMAND...: COMMAND from $work under min(CAP, time left), appended to
# LOGFILE; one line of status and time in session.log.
run() {
  local stage="$1" cap="$2" file="$3"
  shift 3
  local limit
  limit=$(( $(left) < cap ? $(left) : cap ))
  if [ "$limit" -lt 20 ]; then say "$stage: skipped, ${limit}s left"; return 0; fi
  local start=$SECONDS
  echo "== $stage: $*" >> "$file"
  (cd "$work" && timeout --signal=INT --kill-after=15 "$limit" "$@") >> "$file" 2>&1
  local status=$?
  local verdict=ok
  if [ "$status" = 124 ] || [ "$status" = 137 ]; then verdict="timed out after ${limit}s"
  elif [ "$status" != 0 ]; then verdict="failed (exit $status)"; fi
  say "$stage: $verdict in $(( SECONDS - start ))s"
  tail -n 15 "$file" | sed "s/^/  $stage | /"
  return "$status"
}

tests=("$py" -m pytest "$repo/tests" -q -ra -p no:cacheprovider -n "$cores")

export AMFLOW_REVISION="${AMFLOW_REVISION:-$(git -C "$repo" rev-parse --short HEAD 2>/dev/null)}"
say "gpu_session.sh $([ "$dry_run" = 1 ] && echo '--dry-run ')$stages: $(date -u +%FT%TZ), ${cores} cores, limit ${session_seconds}s, revision ${AMFLOW_REVISION:-unknown}"
"$py" -c 'import platform, torch, triton; print("python", platform.python_version(), "torch", torch.__version__,
  "triton", triton.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' \
  2>&1 | tee -a "$log"
if [ "$dry_run" = 0 ]; then command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee -a "$log"; fi

for stage in $stages; do
  case "$stage" in
    build)
      if [ "$dry_run" = 1 ]; then kind=cpu; arch=""; else
        kind=cuda
        arch="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
      fi
      TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$cores" AMFLOW_BUILD_EXTENSION="$kind" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" \
        run build 300 "$out/build.log" "$py" -m pip install --no-build-isolation --no-deps "$repo" || exit 1
      ;;
    check)
      run check 60 "$out/check.log" "$py" -P -m amflow_kernels --require "$([ "$dry_run" = 1 ] && echo cpu || echo cuda)" || exit 1
      ;;
    smoke)
      if [ "$dry_run" = 1 ]; then
        AMFLOW_GPU_GRIDS_ON_CPU=1 AMFLOW_COUNT_COMPILES="$work/compiles" AMFLOW_AUTOTUNE=first \
          run smoke 100000 "$out/tests.log" "${tests[@]}" -m smoke -x
        say "smoke: $("$py" "$repo/tests/triton_compiles.py" "$work/compiles") distinct Triton compilations"
      else
        AMFLOW_AUTOTUNE=first run smoke 180 "$out/tests.log" "${tests[@]}" -m smoke -x --timeout=120 || exit 1
      fi
      ;;
    sanitize)
      if [ "$dry_run" = 1 ]; then
        run sanitize 60 "$out/sanitize.log" "$py" -P "$repo/bench/sanitize_cases.py" --backend cpu
        say "sanitize: compute-sanitizer skipped (no GPU)"
      else
        for tool in memcheck racecheck initcheck; do
          run "sanitize-$tool" 60 "$out/sanitize.log" compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
            "$py" -P "$repo/bench/sanitize_cases.py"
        done
      fi
      ;;
    bench)
      benches=("$repo/bench/bench_am_flow.py" "$repo/bench/bench_attention_colsum.py" "$repo/bench/bench_linear_attention.py"
               "$repo/bench/bench_models.py")
      mode="${AMFLOW_BENCH_AUTOTUNE:-first}"
      AMFLOW_AUTOTUNE="$mode" run bench "$([ "$mode" = time ] && echo 420 || echo 300)" "$out/bench.log" "$py" -m pytest "${benches[@]}" -q -p no:cacheprovider -k cuda
      say "bench: autotune $mode"
      cp "$repo"/bench/results/*-partial.* "$out/" 2>/dev/null
      ;;
    full)
      if [ "$dry_run" = 1 ]; then
        run full 120 "$out/tests.log" "$py" -m pytest "$repo/tests" -q -p no:cacheprovider --collect-only -m "gpu and not smoke"
      else
        AMFLOW_AUTOTUNE=first run full 100000 "$out/tests.log" "${tests[@]}" -m "gpu and not smoke" --timeout=300
      fi
      ;;
    *)
      echo "gpu_session.sh: unknown stage '$stage'; stages are build, check, smoke, sanitize, bench, full" >&2
      exit 2
      ;;
  esac
done
say "gpu_session.sh: done at $(date -u +%FT%TZ)"
