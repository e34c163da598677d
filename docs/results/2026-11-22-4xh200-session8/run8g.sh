#!/usr/bin/env bash
# Eighth session, 4xH200: the session's last code (a refactor of the launch arguments after run8c's check), from a
# copy at the commit that added this script: cuda self-test and the harness cuda vs reference (both modes).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R=$OUT/last; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world 4 --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
cd $OUT && tar -czf last.tgz last && rm -rf last
