#!/usr/bin/env bash
# Eighth session, 4xH200, after run8b showed the first pull kernel slower than the push at 20 SMs (0.667 vs 0.603
# ms): the pull kernel with every index in processing order (one load each, the tile after next's indices loaded
# ahead), from a copy of the repository at the commit that added this script:
# 1. correctness: cuda self-test and the harness cuda vs reference (both modes);
# 2. back to back, cuda at 74e8706 (ab_before/, the push) and here (the pull) alternating, 20 / 32 / 64 SMs;
# 3. a profile of one cached dispatch at 20 SMs (bf16), and the probe's kernels at 20 / 32 / 64 SMs.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R=$OUT/ab; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== selftest"; PYTHONPATH=. timeout -k 5 200 python3 tools/cuda_selftest.py --world 4 > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back)
ours() {  # ours TREE LABEL SMS [extra...]
  local tree=$1 label=$2 sms=$3; shift 3
  (cd $tree && PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --num-sms $sms --json $R/${label}_sms$sms.json "$@" > $R/${label}_sms$sms.txt 2>&1); echo "=== $label sms=$sms exit $?"
}
for sms in 20 32 64; do ours ab_before before $sms; ours . after $sms; done
ours . profile 20 --profile $R/profile_after_sms20.txt
timeout -k 5 90 "${RUN[@]}" docs/results/2026-11-22-4xh200-session8/pull-probe/pull_probe.py > $R/probe.txt 2>&1; echo "=== probe exit $?"
for f in $R/before_*.txt $R/after_*.txt $R/profile_*.txt; do echo "--- $f"; grep -E "^normal +(dispatch|combine)" $f | cut -c1-120; done
grep -A25 -i "cached" $R/profile_after_sms20.txt | head -40
head -30 $R/probe.txt
cd $OUT && tar -czf ab.tgz ab && rm -rf ab
