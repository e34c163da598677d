#!/usr/bin/env bash
# Fourteenth session: own_rows_bench.py with the chunked own-row gather and host times, on 2 and on 4 of the
# 4xH200 machine's GPUs.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
R=$OUT/run14h; mkdir -p $R
P=docs/results/2026-11-22-session14/own_rows_bench.py
for n in 2 4; do
PYTHONPATH=. timeout -k 5 150 python3 -m torch.distributed.run --standalone --nproc-per-node $n $P > $R/own_rows_$n.txt 2>&1; echo "=== own_rows_$n exit $?"; grep -v Warning $R/own_rows_$n.txt | grep -v "^\s*$" | tail -n 7
done
