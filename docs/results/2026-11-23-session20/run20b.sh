#!/usr/bin/env bash
# Twentieth session: the overlap probe only (sum tiles as vectors, sweep of num_sms / sum_sms / tokens per tile),
# then the cuda self-test (correctness of the code as measured).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run20b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
echo "=== probe"; PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" docs/results/2026-11-23-session20/overlap_probe.py > $R/probe.txt 2>&1; echo "exit $?"; tail -19 $R/probe.txt
echo "=== selftest"; PYTHONPATH=. timeout -k 5 170 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
cd $OUT && tar -czf run20b_$N.tgz run20b_$N && rm -rf run20b_$N
