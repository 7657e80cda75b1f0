#!/usr/bin/env bash
# Everything a GPU check needs, in one call (device time is short): build the extension
# against the machine's own torch, run `python -m amflow_kernels`, the test suite (GPU tests
# in float16, bfloat16 and float32, CPU backend too), then every benchmark. Logs and the
# benchmark JSON/markdown land in $OUT (default bench/results) for committing.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"

AMFLOW_BUILD_EXTENSION=cuda python -m pip install --no-build-isolation --no-deps . 2>&1 | tail -n 3 | tee "$out/install.log"
(cd /tmp && python -m amflow_kernels) 2>&1 | tee "$out/main.log"
python -m pytest tests -q -ra -p no:cacheprovider 2>&1 | tail -n 60 | tee "$out/tests.log"
python -m pytest bench -q -p no:cacheprovider 2>&1 | tail -n 20 | tee "$out/bench.log"
if [ "$out" != bench/results ]; then cp bench/results/*.json bench/results/*.md "$out/" 2>/dev/null; fi
