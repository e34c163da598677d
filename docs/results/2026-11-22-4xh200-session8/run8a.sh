#!/usr/bin/env bash
# Eighth session, 4xH200: correctness of the pulling cached dispatch, from a copy of the repository at the commit
# that added this script: the cuda self-test (now with cached dispatch of x itself and of an fp8 tuple), the
# harness cuda vs reference (both modes, every family), and reference vs the executable spec (normal mode).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R=$OUT/check; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== selftest"; PYTHONPATH=. timeout -k 5 200 python3 tools/cuda_selftest.py --world 4 > $R/selftest.txt 2>&1; echo "exit $?"; tail -3 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt
cd $OUT && tar -czf check.tgz check && rm -rf check
