#!/usr/bin/env bash
# Twenty-third session, 2xH200: the fresh dispatch's bookkeeping as two Triton kernels (route, unpack).
# 1. correctness over NCCL: cuda self-test; harness cuda vs reference, both modes, every family and LL format;
#    in_step_nccl.py for cuda;
# 2. A/B against main before the change (6b273e0, exported into ab_main/, untracked): host time per call issued
#    back to back (host_spy.py, fresh / cached / combine), alternating trees, three rounds;
# 3. tools/bench.py back to back at 32 SMs for both trees, alternating (fresh dispatch, cached dispatch, combine).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}; PART=${PART:-all}
R=$OUT/run23a_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,fp8_round,fp8_ue8m0,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
git rev-parse HEAD > $R/commit.txt 2>/dev/null; git status --short >> $R/commit.txt; nvidia-smi -L > $R/gpus.txt; nproc > $R/nproc.txt
if [ $PART != perf ]; then
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" --json $R/cross_cuda.json > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -2 $R/cross_cuda.txt
echo "=== in_step cuda"; timeout -k 5 120 python3 docs/results/2026-11-22-session19/in_step_nccl.py --world $N --backend cuda > $R/in_step_cuda.txt 2>&1; echo "exit $?"; tail -1 $R/in_step_cuda.txt | cut -c1-160
fi
if [ $PART != check ]; then
D=docs/results/2026-11-23-session21
for i in 1 2 3; do
  for tree in ab_main .; do
    name=$([ $tree = . ] && echo new || echo main)
    DEEP_EP_ROOT=$PWD/$tree OPS=fresh,cached,combine SECONDS_PER_OP=2 timeout -k 5 90 "${RUN[@]}" $D/host_spy.py > $R/host_${name}_$i.txt 2>&1
    echo "$name $i: $(grep 'host per call' $R/host_${name}_$i.txt)"
  done
done
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back --num-sms 32)
for i in 1 2; do
  for tree in ab_main .; do
    name=$([ $tree = . ] && echo new || echo main)
    (cd $tree && PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --json $R/bench_${name}_$i.json > $R/bench_${name}_$i.txt 2>&1); echo "bench $name $i exit $?"
    grep -E "^normal +(dispatch|dispatch_cached|combine) " $R/bench_${name}_$i.txt | cut -c1-130
  done
done
fi
