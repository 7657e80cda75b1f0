#!/usr/bin/env bash
# A GPU check in as few calls as device time allows. Stages (default: all, in this order):
#   build  build the extension against the machine's own torch, run `python -m amflow_kernels`
#   smoke  the GPU grids' covering subset (-m smoke), stopping at the first failure: seconds
#   tests  the test suite: GPU tests in float16, bfloat16 and float32, the CPU backend too
#   bench  every benchmark; the JSON and markdown results land in bench/results
# Where one call may run 10 minutes, run `build tests` and `bench` as two calls. Logs are
# written as they go, to $OUT (default bench/results), so a call cut short still leaves them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
stages="${*:-build smoke tests bench}"

for stage in $stages; do
  case "$stage" in
    build)
      AMFLOW_BUILD_EXTENSION=cuda python -m pip install --no-build-isolation --no-deps . > "$out/install.log" 2>&1
      tail -n 3 "$out/install.log"
      (cd /tmp && python -m amflow_kernels) > "$out/main.log" 2>&1
      cat "$out/main.log"
      ;;
    smoke)
      python -m pytest tests -q -ra -x -m smoke -p no:cacheprovider > "$out/smoke.log" 2>&1
      tail -n 30 "$out/smoke.log"
      ;;
    tests)
      python -m pytest tests -q -ra -p no:cacheprovider --durations=15 > "$out/tests.log" 2>&1
      tail -n 60 "$out/tests.log"
      ;;
    bench)
      python -m pytest bench -q -p no:cacheprovider > "$out/bench.log" 2>&1
      tail -n 20 "$out/bench.log"
      if [ "$out" != bench/results ]; then cp bench/results/*.json bench/results/*.md "$out/" 2>/dev/null; fi
      ;;
    *)
      echo "gpu_session.sh: unknown stage '$stage'; stages are build, smoke, tests, bench" >&2
      exit 2
      ;;
  esac
done
