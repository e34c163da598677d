#!/usr/bin/env bash
# Twenty-third session, 2xH200, at the session's final commit: the self-test and the harness cuda vs reference
# (both modes, every family and LL format), after the last argument-check and harness changes.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run23d_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,fp8_round,fp8_ue8m0,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; grep -E "PASS|FAIL" $R/cross_cuda.txt | cut -c1-110; tail -2 $R/cross_cuda.txt
