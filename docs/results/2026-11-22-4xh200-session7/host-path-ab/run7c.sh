#!/usr/bin/env bash
# Seventh session, 4xH200: the host-path commits 0e9aa8b (shared running count), ce05e94 (one push launch with
# a narrow companion) and the host-int prefix matrices, against f9bfb46 (before them; git archive carried as
# ab_before/, untracked), from a copy of the repository at the commit that added this script:
# 1. correctness: cuda self-test, the harness cuda vs reference (both modes), reference vs the spec (normal);
# 2. back to back, normal mode at 4096 x 7168, bf16 and fp8, cuda and reference, before/after alternating, twice;
# 3. tools/host_breakdown.py with the agreement check, before and after.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world 4 > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt
BENCH=(tools/bench.py --launcher torchrun --dist-backend nccl --mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back)
for i in 1 2; do
  for b in cuda reference; do
    (cd ab_before && PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" "${BENCH[@]}" --backend $b --json $R/${b}_before_$i.json > $R/${b}_before_$i.txt 2>&1); echo "=== $b before $i exit $?"
    PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" "${BENCH[@]}" --backend $b --json $R/${b}_after_$i.json > $R/${b}_after_$i.txt 2>&1; echo "=== $b after $i exit $?"
  done
done
(cd ab_before && CHECK=1 PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" tools/host_breakdown.py > $R/hb_before.txt 2>&1); echo "=== hb before exit $?"
CHECK=1 PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" tools/host_breakdown.py > $R/hb_after.txt 2>&1; echo "=== hb after exit $?"
for f in $R/cuda_*.txt $R/reference_*.txt; do echo "--- $f"; grep -E "^normal +(dispatch|combine)" $f | cut -c1-110; done
for f in $R/hb_*.txt; do echo "--- $f"; grep -E "^==|TOTAL|triton launch|backend\." $f; done
cd $OUT && tar -czf r.tgz r && rm -rf r
