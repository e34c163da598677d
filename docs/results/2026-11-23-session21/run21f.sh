#!/usr/bin/env bash
# Twenty-first session, 2xH200: review_cases_gpu.py (each case on its own) at 0d4b812 (ab_old/, untracked) and fixed.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R=$OUT/run21f_2; mkdir -p $R
D=docs/results/2026-11-23-session21
for tree in ab_old .; do
  name=$([ $tree = . ] && echo fixed || echo before)
  echo "=== review cases, $name"; timeout -k 5 120 python3 -m torch.distributed.run --standalone --nproc-per-node 2 $tree/$D/review_cases_gpu.py > $R/review_$name.txt 2>&1; echo "exit $?"; grep -E "PASS|FAIL" $R/review_$name.txt | cut -c1-220
done
