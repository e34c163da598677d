#!/usr/bin/env bash
# Nineteenth session, 2xH200 (no 4-GPU machine lent): after the façade changes that keep the ranks in step
# (rejected rows, handle serials, dtype fields, the board's given-up mark), re-verify over NCCL:
# 1. cuda self-test; harness cuda vs reference (both modes, every family); reference vs the spec;
# 2. in_step_nccl.py for the reference and the cuda backend (errors on one rank, then rounds == spec);
# 3. one back-to-back bench of cuda at 32 SMs (cached dispatch, combine) to see the façade's cost.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run19a_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
git rev-parse HEAD > $R/commit.txt 2>/dev/null; nvidia-smi -L > $R/gpus.txt
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" --json $R/cross_cuda.json > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal,low_latency "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt
for b in reference cuda; do
  echo "=== in_step $b"; timeout -k 5 120 python3 docs/results/2026-11-22-session19/in_step_nccl.py --world $N --backend $b > $R/in_step_$b.txt 2>&1; echo "exit $?"; cat $R/in_step_$b.txt | cut -c1-160
done
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --num-sms 32 --json $R/cuda_sms32.json > $R/cuda_sms32.txt 2>&1; echo "=== bench exit $?"
grep -E "^normal +(dispatch|dispatch_cached|combine) " $R/cuda_sms32.txt | cut -c1-130
cd $OUT && tar -czf run19a_$N.tgz run19a_$N && rm -rf run19a_$N
