#!/usr/bin/env bash
# Ninth session, 4xH200: the session's last code (the commit that added this script), one lease:
# 1. correctness: cuda self-test; the harness cuda vs reference (both modes) and reference vs the executable spec;
# 2. the reference backend twice (issue 7's GPU target) and the cuda backend at 20 / 32 SMs, back to back;
# 3. tools/host_breakdown.py with the agreement check.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
R=$OUT/run9e_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
bench() {  # bench BACKEND LABEL [extra...]
  local backend=$1 label=$2; shift 2
  PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend $backend "${SHAPE[@]}" --json $R/$label.json "$@" > $R/$label.txt 2>&1; echo "=== $label exit $?"
}
bench reference reference_1; bench cuda cuda_sms20 --num-sms 20; bench reference reference_2; bench cuda cuda_sms32 --num-sms 32
CHECK=1 PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/host_breakdown.py > $R/host_breakdown_check1.txt 2>&1; echo "=== host_breakdown exit $?"
for f in $R/reference_*.txt $R/cuda_*.txt; do echo "--- $f"; grep -E "^normal +(dispatch|dispatch_cached|combine)" $f | cut -c1-120; done
grep "back to back" $R/host_breakdown_check1.txt
cd $OUT && tar -czf run9e_$N.tgz run9e_$N && rm -rf run9e_$N
