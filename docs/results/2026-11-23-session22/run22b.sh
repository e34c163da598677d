#!/usr/bin/env bash
# Twenty-second session, 2xH200: the session's last library code, after the review fixes (façade, harness,
# permute/moe, low-latency kernels), over NCCL:
# 1. cuda self-test; harness cuda vs reference and reference vs spec, both modes, every LL format, the
#    harness's new normal-mode steps (fp8 cached dispatch, num_worst_tokens, no top-k, signed weights);
# 2. in_step_nccl.py (errors on one rank, then rounds == spec) for reference and cuda;
# 3. the low-latency CUDA-graph check (cuda); the gpu-marked permute tests (no host sync, graph capture,
#    device asserts naming recv_topk_idx);
# 4. one back-to-back bench of cuda at 32 SMs (cached dispatch, combine).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run22b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,fp8_round,fp8_ue8m0,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
nvidia-smi -L > $R/gpus.txt
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" --json $R/cross_cuda.json > $R/cross_cuda.txt 2>&1; echo "exit $?"; grep -E "^(dispatch|cached|combine|low_lat|layout)" $R/cross_cuda.txt | cut -c1-110; tail -2 $R/cross_cuda.txt
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal,low_latency "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -2 $R/cross_spec.txt
for b in reference cuda; do
  echo "=== in_step $b"; timeout -k 5 120 python3 docs/results/2026-11-22-session19/in_step_nccl.py --world $N --backend $b > $R/in_step_$b.txt 2>&1; echo "exit $?"; tail -2 $R/in_step_$b.txt | cut -c1-160
done
echo "=== ll graph cuda"; PYTHONPATH=. timeout -k 5 120 python3 tools/ll_graph_check.py --world $N --backend cuda > $R/ll_graph.txt 2>&1; echo "exit $?"; tail -2 $R/ll_graph.txt
echo "=== pytest -m gpu permute"; timeout -k 5 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_permute.py > $R/pytest_gpu_permute.txt 2>&1; echo "exit $?"; tail -3 $R/pytest_gpu_permute.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --num-sms 32 --json $R/cuda_sms32.json > $R/cuda_sms32.txt 2>&1; echo "=== bench exit $?"
grep -E "^normal +(dispatch|dispatch_cached|combine) " $R/cuda_sms32.txt | cut -c1-130
