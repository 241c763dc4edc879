#!/usr/bin/env bash
# One call on the lent GPU machine (offline; torch + triton preinstalled):
#   bash tools/gpu_run.sh tests            # nox --no-venv -s tests-gpu, log to $OUT
#   bash tools/gpu_run.sh bench NAME...    # python -m tools.bench.bench_NAME, JSON to $OUT
#                                          # (profile_X runs tools.bench.profile_X)
# Wheels the machine lacks (nox and its pure-Python needs, sageattention) travel in .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 ADAATTN_RESULTS="$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
what=${1:-tests}; shift || true
case "$what" in
  tests)
    python3 -m nox --no-venv -s tests-gpu -- -q --durations=15 "$@" 2>&1 | tee "$OUT/tests-gpu.log"
    exit "${PIPESTATUS[0]}"
    ;;
  bench)
    export PYTHONPATH="packages/adaattn-linalg/src:packages/adaattn-precision/src:packages/adaattn-kernels/src:packages/adaattn/src:${PYTHONPATH:-}"
    rc=0
    for name in "$@"; do
      case "$name" in profile_*) module=$name ;; *) module=bench_$name ;; esac
      echo "=== $module"
      python3 -m "tools.bench.$module" 2>&1 | tee "$OUT/$module.log" || rc=1
    done
    exit $rc
    ;;
esac
