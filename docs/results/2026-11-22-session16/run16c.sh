#!/usr/bin/env bash
# Sixteenth session: nvlink_mix_probe.py (SM pulls, copy-engine pulls and both together, against NCCL) on NPROC
# GPUs, twice.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
N=${NPROC:-4}
R=$OUT/run16c_$N; mkdir -p $R
P=docs/results/2026-11-22-session16/nvlink_mix_probe.py
for i in 1 2; do
  PYTHONPATH=. timeout -k 5 150 python3 -m torch.distributed.run --standalone --nproc-per-node $N $P > $R/probe_$i.txt 2>&1
  echo "=== probe_$i exit $?"; grep -E "^  |ranks|MISMATCH|Error" $R/probe_$i.txt | head -30
done
