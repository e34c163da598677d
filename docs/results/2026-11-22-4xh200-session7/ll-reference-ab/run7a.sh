#!/usr/bin/env bash
# Seventh session, 4xH200, from a copy of the repository at f234d72 (uncommitted: nothing):
# 1. the harness, reference over NCCL vs the executable spec, low-latency mode (the reference low-latency change);
# 2. the reference low-latency benchmark before (346ef3a, an archive in ab_before/) and after, alternating, twice;
# 3. the cuda backend, normal mode, fp8 then bf16, 20 and 64 SMs, with a profile of one call of each op.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
rm -rf ab_before && mkdir ab_before && git archive 346ef3a deep_ep tools reference setup.py pyproject.toml | tar -x -C ab_before
echo "=== crosscheck"; PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --families all --large --modes low_latency --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60 > $R/cross_ll_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_ll_spec.txt
LL=(tools/bench.py --launcher torchrun --dist-backend nccl --backend reference --mode ll --ll-tokens 128 256 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph)
for i in 1 2; do
  (cd ab_before && PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" "${LL[@]}" --json $R/ll_before_$i.json > $R/ll_before_$i.txt 2>&1); echo "=== ll before $i exit $?"
  PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" "${LL[@]}" --json $R/ll_after_$i.json > $R/ll_after_$i.txt 2>&1; echo "=== ll after $i exit $?"
done
for sms in 20 64; do
  PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda --mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype fp8 bfloat16 --iters 30 --warmup 10 --timing back-to-back --num-sms $sms --profile $R/prof_cuda_fp8_sms$sms.txt --json $R/cuda_sms$sms.json > $R/cuda_sms$sms.txt 2>&1; echo "=== cuda sms $sms exit $?"
done
rm -rf ab_before
for f in $R/ll_*.txt $R/cuda_sms*.txt; do echo "--- $f"; grep -E "^(ll|normal) " $f; done
for f in $R/prof_cuda_fp8_sms*.txt; do echo "--- $f"; grep -A6 "^== .*cached dispatch" $f | cut -c1-120; done
