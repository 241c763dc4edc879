#!/usr/bin/env bash
# On the GPU machine: the dense forward under each exp2 mode (ADAATTN_FLASH_EXP2), SDPA peers in
# the same process, head_dim 128. One JSON per mode under $OUT/exp2_<mode>/flash.json.
#   bash tools/bench/exp2_variants.sh [mode...]     # default: mufu poly split
OUT=${OUT:-/tmp/out}
export PYTHONPATH=packages/adaattn-linalg/src:packages/adaattn-precision/src:packages/adaattn-kernels/src:packages/adaattn/src PYTHONUNBUFFERED=1
for mode in "${@:-mufu poly split}"; do
  for m in $mode; do
    mkdir -p "$OUT/exp2_$m"
    echo "=== ADAATTN_FLASH_EXP2=$m"
    ADAATTN_FLASH_EXP2=$m ADAATTN_RESULTS="$OUT/exp2_$m" python3 -m tools.bench.bench_flash \
      --no-flex --no-backward --head-dims 128 --seqs 8192 16384 2>&1 | grep -E "TF/s|head_dim"
  done
done
