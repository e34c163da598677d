#!/usr/bin/env bash
# Twenty-first session, 2xH200: where the cuda backend's host time goes per cached dispatch and combine.
# 1. host time per call issued back to back, unsampled; 2. the same under py-spy (all ranks, 2000 Hz, raw
# stacks; py-spy carried in out/); 3. tools/host_breakdown.py with the agreement check on.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}; TAG=${TAG:-a}
R=$OUT/run21${TAG}_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
SPY=docs/results/2026-11-23-session21/host_spy.py
git rev-parse HEAD > $R/commit.txt 2>/dev/null; nvidia-smi -L > $R/gpus.txt; nproc > $R/cpus.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $R/gpus.txt
for i in 1 2; do
  echo "=== unsampled $i"; timeout -k 5 90 "${RUN[@]}" $SPY > $R/unsampled_$i.txt 2>&1; echo "exit $?"; grep "host per call" $R/unsampled_$i.txt
done
chmod +x out/py-spy
echo "=== py-spy"; timeout -k 5 120 out/py-spy record --subprocesses --nonblocking -r 2000 -f raw -o $R/spy.txt -- "${RUN[@]}" $SPY > $R/sampled.txt 2>&1; echo "exit $?"; tail -3 $R/sampled.txt
echo "=== py-spy native"; SECONDS_PER_OP=2 timeout -k 5 120 out/py-spy record --native --subprocesses --nonblocking -r 1000 -f raw -o $R/spy_native.txt -- "${RUN[@]}" $SPY > $R/sampled_native.txt 2>&1; echo "exit $?"; tail -3 $R/sampled_native.txt
echo "=== host_breakdown"; CHECK=1 PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/host_breakdown.py > $R/host_breakdown.txt 2>&1; echo "exit $?"; grep -A12 "== combine" $R/host_breakdown.txt
cd $OUT && tar -czf run21${TAG}_$N.tgz run21${TAG}_$N && rm -rf run21${TAG}_$N
