#!/usr/bin/env bash
# Twentieth session, 2xH200: the overlapped combine (push_sum_kernel, branch overlap-combine).
# 1. cuda self-test; harness cuda vs reference, normal mode, every family (bit-equal or fail);
# 2. overlap_probe.py: device time per combine, overlapped (num_sms push + sum_sms summing programs) vs unfused;
# 3. one back-to-back bench of cuda at 32 SMs.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run20a_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
nvidia-smi -L > $R/gpus.txt; python3 -c "import triton, torch; print(torch.__version__, triton.__version__)" > $R/versions.txt
echo "=== selftest"; PYTHONPATH=. timeout -k 5 170 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -3 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal "${PLAN[@]}" --json $R/cross_cuda.json > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
echo "=== probe"; PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" docs/results/2026-11-23-session20/overlap_probe.py > $R/probe.txt 2>&1; echo "exit $?"; tail -14 $R/probe.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --num-sms 32 --json $R/cuda_sms32.json > $R/cuda_sms32.txt 2>&1; echo "=== bench exit $?"
grep -E "^normal +(dispatch|dispatch_cached|combine) " $R/cuda_sms32.txt | cut -c1-130
cd $OUT && tar -czf run20a_$N.tgz run20a_$N && rm -rf run20a_$N
