#!/usr/bin/env bash
# Twenty-fifth session, 2xH200: the fresh dispatch's count kernel on one program per channel (was one program,
# 125 us on the device, waited for by the host's read right after) and its prefix matrices through reused pinned
# memory. PART=check: self-test, harness cuda vs reference (both modes, every family and LL format), in_step for
# cuda. PART=perf: A/B against main before the change (6e17359, `git archive 6e17359 deep_ep tools reference` into
# ab_main/, untracked, carried with the working tree), alternating trees: host time per phase (fresh_phases.py),
# host time per op issued back to back (host_spy.py), bench.py back to back at 32 SMs; then fresh_timeline.py.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}; PART=${PART:-all}
R=$OUT/run25b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,fp8_round,fp8_ue8m0,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
D=docs/results/2026-11-23-session25
git rev-parse HEAD > $R/commit.txt 2>/dev/null; git status --short >> $R/commit.txt; nvidia-smi -L > $R/gpus.txt; nproc --all > $R/nproc.txt
if [ $PART != perf ]; then
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -2 $R/cross_cuda.txt
echo "=== in_step cuda"; timeout -k 5 120 python3 docs/results/2026-11-22-session19/in_step_nccl.py --world $N --backend cuda > $R/in_step_cuda.txt 2>&1; echo "exit $?"; tail -1 $R/in_step_cuda.txt | cut -c1-160
fi
if [ $PART != check ]; then
for i in 1 2; do
  for tree in ab_main .; do
    name=$([ $tree = . ] && echo new || echo main)
    DEEP_EP_ROOT=$PWD/$tree timeout -k 5 90 "${RUN[@]}" $D/fresh_phases.py > $R/phases_${name}_$i.txt 2>&1
    echo "$name $i: $(grep 'per call' $R/phases_${name}_$i.txt)"
    DEEP_EP_ROOT=$PWD/$tree OPS=fresh,cached,combine SECONDS_PER_OP=2 timeout -k 5 90 "${RUN[@]}" docs/results/2026-11-23-session21/host_spy.py > $R/host_${name}_$i.txt 2>&1
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
echo "=== timeline (new)"; timeout -k 5 90 "${RUN[@]}" $D/fresh_timeline.py > $R/timeline.txt 2>&1; echo "exit $?"; grep -E "call lengths|count_kernel|Memcpy DtoH" $R/timeline.txt | head -12
fi
cd $OUT && tar -czf run25b_$N.tgz run25b_$N && rm -rf run25b_$N
