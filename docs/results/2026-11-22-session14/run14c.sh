#!/usr/bin/env bash
# Fourteenth session, 4xH200: the cached dispatch's transfer with the own rows gathered beside the all-to-all,
# NCCL's kernel on a high-priority stream or not (own_rows_bench.py), twice.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
N=${NPROC:-4}
R=$OUT/run14c_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
P=docs/results/2026-11-22-session14/own_rows_bench.py
for i in 1 2; do
PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" $P > $R/own_rows_$i.txt 2>&1; echo "=== own_rows_$i exit $?"; grep -v Warning $R/own_rows_$i.txt | grep -v "^\s*$" | tail -n 8
done
