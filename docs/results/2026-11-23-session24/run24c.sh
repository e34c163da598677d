#!/usr/bin/env bash
# Twenty-fourth session, 2xH200, the session's last library code (the combine on the copy engines, the merged
# reviews: Ascend, host board, executable spec / fp8 NaN scales): self-test and harness cuda vs reference with the
# copy engines (auto: on at 2 ranks) and without (0); reference vs the executable spec; in_step_nccl.py for both
# backends; the low-latency CUDA-graph check; then bench.py back to back at 32 SMs once.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run24c_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,fp8_round,fp8_ue8m0,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
nvidia-smi -L > $R/gpus.txt
for ce in auto 0; do
  echo "=== selftest, copy engines $ce"; DEEP_EP_CUDA_COPY_ENGINES=$ce PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest_$ce.txt 2>&1; echo "exit $?"; tail -2 $R/selftest_$ce.txt
  echo "=== crosscheck cuda, copy engines $ce"; DEEP_EP_CUDA_COPY_ENGINES=$ce PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda_$ce.txt 2>&1; echo "exit $?"; tail -2 $R/cross_cuda_$ce.txt
done
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal,low_latency "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -2 $R/cross_spec.txt
for b in reference cuda; do
  echo "=== in_step $b"; timeout -k 5 100 python3 docs/results/2026-11-22-session19/in_step_nccl.py --world $N --backend $b > $R/in_step_$b.txt 2>&1; echo "exit $?"; tail -2 $R/in_step_$b.txt | cut -c1-160
done
echo "=== ll graph cuda"; PYTHONPATH=. timeout -k 5 100 python3 tools/ll_graph_check.py --world $N --backend cuda > $R/ll_graph.txt 2>&1; echo "exit $?"; tail -2 $R/ll_graph.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back --num-sms 32)
echo "=== bench"; PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --json $R/bench.json > $R/bench.txt 2>&1; echo "exit $?"; grep -E "^normal +(dispatch|dispatch_cached|combine) " $R/bench.txt | cut -c1-125
cd $OUT && tar -czf run24c_$N.tgz run24c_$N && rm -rf run24c_$N
