#!/usr/bin/env bash
# On the GPU machine, one call: sweep the forward's exp2 modes next to SDPA (tune_flash.py) and
# write Nsight Compute reports of our forward and cuDNN's (head_dim 128, seq 8192, bf16) to $OUT.
#   bash tools/bench/profile_flash.sh
set -x
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export PYTHONPATH=packages/adaattn-linalg/src:packages/adaattn-precision/src:packages/adaattn-kernels/src:packages/adaattn/src PYTHONUNBUFFERED=1 ADAATTN_RESULTS=$OUT
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
python3 -c "import torch,triton;print(torch.__version__,triton.__version__,torch.backends.cudnn.version())"
timeout 330 python3 -m tools.bench.tune_flash --no-backward --exp2 mufu quarter split poly --fwd-top 3 2>&1 | grep -v Warning | tee $OUT/tune.log
NCU="ncu --nvtx --nvtx-include target/ --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis"
for m in ours cudnn; do
  ADAATTN_FLASH_AUTOTUNE=0 timeout 100 $NCU python3 -m tools.bench.profile_flash --method $m > $OUT/ncu_$m.txt 2>&1; echo "ncu $m rc=$?"
done
ADAATTN_FLASH_AUTOTUNE=0 ADAATTN_FLASH_EXP2=split timeout 60 $NCU python3 -m tools.bench.profile_flash --method ours > $OUT/ncu_ours_split.txt 2>&1
tail -5 $OUT/ncu_ours.txt
