#!/usr/bin/env bash
# Twenty-first session, 2xH200: the host path trimmed (working tree) against main (80ce2ff, in ab_main/, untracked):
# host time per call issued back to back, alternating trees; single-op host costs; the cuda self-test.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}; TAG=${TAG:-b}
R=$OUT/run21${TAG}_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
D=docs/results/2026-11-23-session21
git rev-parse HEAD > $R/commit.txt 2>/dev/null; git status --short >> $R/commit.txt; nvidia-smi -L > $R/gpus.txt
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
for i in 1 2 3; do
  for tree in ab_main .; do
    name=$([ $tree = . ] && echo new || echo main)
    DEEP_EP_ROOT=$PWD/$tree SECONDS_PER_OP=2 timeout -k 5 90 "${RUN[@]}" $D/host_spy.py > $R/host_${name}_$i.txt 2>&1
    echo "$name $i: $(grep 'host per call' $R/host_${name}_$i.txt)"
  done
done
echo "=== host costs"; timeout -k 5 90 "${RUN[@]}" $D/host_costs.py > $R/host_costs.txt 2>&1; echo "exit $?"; cat $R/host_costs.txt | grep " us"
cd $OUT && tar -czf run21${TAG}_$N.tgz run21${TAG}_$N && rm -rf run21${TAG}_$N
