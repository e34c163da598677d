#!/usr/bin/env bash
# Fourteenth session: why the high-priority path (35a48f1) slowed the 2-rank cached dispatch in run14e_2 (2 of the
# 4xH200 machine's GPUs): timeline.py and the twelfth session's burst.py (host time per call, a profiled burst) at
# 2 ranks, for the working tree and ab_main/ (b14e7cd).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
N=${NPROC:-2}
R=$OUT/run14g_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
HERE=$PWD
for tree in new before; do
  dir=.; [ $tree = before ] && dir=ab_main
  (cd $dir && PYTHONPATH=. timeout -k 5 100 "${RUN[@]}" $HERE/docs/results/2026-11-22-session14/timeline.py > $R/timeline_$tree.txt 2>&1); echo "=== timeline_$tree exit $?"
  grep -E "^==|a2a kernel mean|last to start" $R/timeline_$tree.txt | cut -c1-160
  (cd $dir && PYTHONPATH=. timeout -k 5 100 "${RUN[@]}" $HERE/docs/results/2026-11-22-session12/burst.py > $R/burst_$tree.txt 2>&1); echo "=== burst_$tree exit $?"
  grep -E "^==|unprofiled|bursts of 10" $R/burst_$tree.txt | cut -c1-220
done
cd $OUT && tar -czf run14g_$N.tgz run14g_$N && rm -rf run14g_$N
