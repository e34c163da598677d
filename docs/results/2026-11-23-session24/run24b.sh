#!/usr/bin/env bash
# Twenty-fourth session: the cuda combine's blocks on the copy engines (DEEP_EP_CUDA_COPY_ENGINES, auto = on at 2
# ranks) against the push kernel. Correctness (self-test, harness cuda vs reference, both modes), then
# queued_cuda.py (device time per combine alone and as issued, both ways, bits vs the reference) at 32 and 20 SMs,
# then tools/bench.py back to back at 32 SMs, copy engines (1) and push kernel (0) alternating.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
PART=${PART:-all}
R=$OUT/run24b_${PART}_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
nvidia-smi -L > $R/gpus.txt
if [ $PART != perf ]; then
  PLAN=(--families all --large --dtypes bf16,fp8,fp8_round,fp8_ue8m0,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
  for ce in ${CE_CHECK:-auto}; do
    echo "=== selftest, copy engines $ce"; DEEP_EP_CUDA_COPY_ENGINES=$ce PYTHONPATH=. timeout -k 5 200 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest_$ce.txt 2>&1; echo "exit $?"; tail -2 $R/selftest_$ce.txt
    echo "=== crosscheck cuda, copy engines $ce"; DEEP_EP_CUDA_COPY_ENGINES=$ce PYTHONPATH=. timeout -k 5 220 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda_$ce.txt 2>&1; echo "exit $?"; tail -2 $R/cross_cuda_$ce.txt
  done
fi
if [ $PART != check ]; then
  for sms in 32 20; do
    echo "=== queued_cuda.py, $sms SMs"; NUM_SMS=$sms timeout -k 5 120 "${RUN[@]}" docs/results/2026-11-23-session24/queued_cuda.py > $R/queued_sms$sms.txt 2>&1; echo "exit $?"; grep -E "^  |bits|MISMATCH" $R/queued_sms$sms.txt
  done
  SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back --num-sms 32)
  for i in 1 2; do
    for ce in 1 0; do
      echo "=== bench, copy engines $ce, run $i"; DEEP_EP_CUDA_COPY_ENGINES=$ce PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --json $R/bench_ce${ce}_$i.json > $R/bench_ce${ce}_$i.txt 2>&1; echo "exit $?"; grep -E "^normal +(dispatch_cached|combine) " $R/bench_ce${ce}_$i.txt | cut -c1-125
    done
  done
fi
cd $OUT && tar -czf run24b_${PART}_$N.tgz run24b_${PART}_$N && rm -rf run24b_${PART}_$N
