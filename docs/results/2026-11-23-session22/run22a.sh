#!/usr/bin/env bash
# Twenty-second session, 2xH200: a first check of this session's low-latency fixes on hardware:
# 1. the cuda self-test (its new check: the fused fp8 cast against deep_ep.quant on NaN / infinity rows);
# 2. harness cuda vs reference, low-latency mode, every LL format (bf16, fp8, fp8_round, fp8_ue8m0, int8).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run22a_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
nvidia-smi -L > $R/gpus.txt
echo "=== selftest"; PYTHONPATH=. timeout -k 5 200 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"
grep -E "fused-fp8|FAIL|PASS|passed" $R/selftest.txt | tail -25
echo "=== crosscheck LL formats"; PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes low_latency --families all --large --dtypes bf16,fp8,fp8_round,fp8_ue8m0,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60 --json $R/cross_ll.json > $R/cross_ll.txt 2>&1; echo "exit $?"; tail -4 $R/cross_ll.txt
