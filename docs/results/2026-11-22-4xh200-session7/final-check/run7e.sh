#!/usr/bin/env bash
# Seventh session, 4xH200: correctness at the session's last code commit (run from the commit that added this
# script): cuda self-test, harness cuda vs reference and reference vs spec (both modes, every family, H = 7168,
# bf16/fp8/int8), CUDA-graph capture == eager for both backends.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 PYTHONPATH=.
R=$OUT; RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
PLAN=(--families all --large --modes normal,low_latency --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
git log --oneline -1 2>/dev/null > $R/commit.txt
echo "=== selftest"; timeout -k 5 150 python3 tools/cuda_selftest.py --world 4 > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== cuda vs reference"; timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
echo "=== reference vs spec"; timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt
for b in reference cuda; do echo "=== ll graph $b"; timeout -k 5 90 python3 tools/ll_graph_check.py --world 4 --backend $b > $R/ll_graph_$b.txt 2>&1; echo "exit $?"; tail -1 $R/ll_graph_$b.txt; done
