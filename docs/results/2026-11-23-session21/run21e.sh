#!/usr/bin/env bash
# Twenty-first session, 2xH200: the review's cases on GPUs (cuda vs reference, bit for bit) at the fixed tree and at
# 0d4b812 (before the fixes, in ab_old/, untracked), then the nineteenth session's run19a.sh (self-test, harness,
# in-step, bench) at the fixed tree.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}; TAG=${TAG:-e}
R=$OUT/run21${TAG}_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
D=docs/results/2026-11-23-session21
for tree in . ab_old; do
  name=$([ $tree = . ] && echo fixed || echo before)
  echo "=== review cases, $name"; timeout -k 5 120 "${RUN[@]}" $tree/$D/review_cases_gpu.py > $R/review_$name.txt 2>&1; echo "exit $?"; grep -E "PASS|FAIL|Error" $R/review_$name.txt | cut -c1-200 | head -12
done
cd $OUT && tar -czf run21${TAG}_$N.tgz run21${TAG}_$N && rm -rf run21${TAG}_$N && cd - > /dev/null
bash docs/results/2026-11-22-session19/run19a.sh
