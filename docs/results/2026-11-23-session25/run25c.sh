#!/usr/bin/env bash
# Twenty-fifth session, 2xH200: the fresh dispatch A/B again, four alternating rounds of fresh_phases.py (main
# 6e17359 in ab_main/ against the working tree), then pinned_bench.py and launch_bench.py on one GPU.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run25c_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
D=docs/results/2026-11-23-session25
git rev-parse HEAD > $R/commit.txt 2>/dev/null; git status --short >> $R/commit.txt; nvidia-smi -L > $R/gpus.txt
echo "=== pinned"; timeout -k 5 60 python3 $D/pinned_bench.py 2>&1 | tee $R/pinned.txt
echo "=== launch"; timeout -k 5 60 python3 $D/launch_bench.py 2>&1 | tee $R/launch.txt
for i in 1 2 3 4; do
  for tree in ab_main .; do
    name=$([ $tree = . ] && echo new || echo main)
    DEEP_EP_ROOT=$PWD/$tree timeout -k 5 90 "${RUN[@]}" $D/fresh_phases.py > $R/phases_${name}_$i.txt 2>&1
    echo "$name $i: $(grep 'per call' $R/phases_${name}_$i.txt) | $(grep -E 'count exchange' $R/phases_${name}_$i.txt | tr -s ' ')"
  done
done
cd $OUT && tar -czf run25c_$N.tgz run25c_$N && rm -rf run25c_$N
