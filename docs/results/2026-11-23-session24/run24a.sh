#!/usr/bin/env bash
# Twenty-fourth session, written for 4xH200 (NPROC=4; runs on 2 GPUs with NPROC=2). Carry .whl/ (the
# tokenspeed-deepep wheel, see tools/gpu_bench.sh).
# PART=check: cuda self-test; harness cuda vs reference and reference vs the executable spec over NCCL, both
#   modes, every family and low-latency format; the low-latency CUDA-graph check.
# PART=perf: issue 7 and 8's shape (4096 tokens x 7168 bf16, top-8 of 256), timed back to back as DeepEP's tests
#   time, ROUNDS rounds (default 1): the reference backend; the cuda backend at 20 and 32 SMs (and at 32 with the combine
#   on the copy engines, DEEP_EP_CUDA_COPY_ENGINES=1, plus queued_cuda.py); upstream DeepEP at 20, 32, 64 SMs;
#   low-latency at T = 128 (kernel times) for cuda and DeepEP.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
PART=${PART:-check}
R=$OUT/run24a_${PART}_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
nvidia-smi -L > $R/gpus.txt; git rev-parse HEAD > $R/commit.txt 2>/dev/null
if [ $PART = check ]; then
  PLAN=(--families all --large --dtypes bf16,fp8,fp8_round,fp8_ue8m0,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
  echo "=== selftest"; PYTHONPATH=. timeout -k 5 200 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
  echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 220 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -2 $R/cross_cuda.txt
  echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal,low_latency "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -2 $R/cross_spec.txt
  echo "=== ll graph cuda"; PYTHONPATH=. timeout -k 5 100 python3 tools/ll_graph_check.py --world $N --backend cuda > $R/ll_graph.txt 2>&1; echo "exit $?"; tail -2 $R/ll_graph.txt
else
  UP=/tmp/upstream
  python3 -m pip install -q --no-index --no-deps --target $UP .whl/tokenspeed_deepep-*.whl
  NVSHMEM=$(python3 -c "import glob,os,site;h=[g for d in site.getsitepackages() for g in glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))];print(os.path.dirname(h[0]) if h else '')")
  UPSTREAM=(env PYTHONPATH=$UP LD_LIBRARY_PATH=${NVSHMEM:+$NVSHMEM:}${LD_LIBRARY_PATH:-} "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UP --launcher torchrun --dist-backend nccl)
  OURS=(env PYTHONPATH=. "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl)
  SHAPE=(--hidden 7168 --topk 8 --experts 256 --iters 30 --warmup 10 --timing back-to-back)
  NORMAL=(--mode normal --tokens 4096 --dtype bfloat16)
  LL=(--mode ll --ll-tokens 128 --dtype bfloat16 fp8 --ll-kernel-times)
  row() { grep -E "^(normal|ll|low)" $1 | grep -E "dispatch|combine" | cut -c1-130; }
  for round in $(seq ${ROUNDS:-1}); do
    echo "=== round $round: reference"; timeout -k 5 90 "${OURS[@]}" --backend reference "${NORMAL[@]}" "${SHAPE[@]}" --json $R/ref_$round.json > $R/ref_$round.txt 2>&1; echo "exit $?"; row $R/ref_$round.txt
    for sms in 20 32; do
      echo "=== round $round: cuda, $sms SMs"; timeout -k 5 90 "${OURS[@]}" --backend cuda "${NORMAL[@]}" "${SHAPE[@]}" --num-sms $sms --json $R/cuda_sms${sms}_$round.json > $R/cuda_sms${sms}_$round.txt 2>&1; echo "exit $?"; row $R/cuda_sms${sms}_$round.txt
    done
    echo "=== round $round: cuda, 32 SMs, combine on the copy engines"; DEEP_EP_CUDA_COPY_ENGINES=1 timeout -k 5 90 "${OURS[@]}" --backend cuda "${NORMAL[@]}" "${SHAPE[@]}" --num-sms 32 --json $R/cuda_ce_sms32_$round.json > $R/cuda_ce_sms32_$round.txt 2>&1; echo "exit $?"; row $R/cuda_ce_sms32_$round.txt
    echo "=== round $round: queued_cuda.py"; timeout -k 5 120 "${RUN[@]}" docs/results/2026-11-23-session24/queued_cuda.py > $R/queued_$round.txt 2>&1; echo "exit $?"; grep -E "^  |bits|MISMATCH" $R/queued_$round.txt
    for sms in 20 32 64; do
      echo "=== round $round: DeepEP, $sms SMs"; timeout -k 5 90 "${UPSTREAM[@]}" "${NORMAL[@]}" "${SHAPE[@]}" --num-sms $sms --json $R/deepep_sms${sms}_$round.json > $R/deepep_sms${sms}_$round.txt 2>&1; echo "exit $?"; row $R/deepep_sms${sms}_$round.txt
    done
    echo "=== round $round: cuda LL"; timeout -k 5 90 "${OURS[@]}" --backend cuda "${LL[@]}" "${SHAPE[@]}" --json $R/cuda_ll_$round.json > $R/cuda_ll_$round.txt 2>&1; echo "exit $?"; row $R/cuda_ll_$round.txt
    echo "=== round $round: DeepEP LL"; timeout -k 5 90 env NVSHMEM_REMOTE_TRANSPORT=none "${UPSTREAM[@]}" "${LL[@]}" "${SHAPE[@]}" --json $R/deepep_ll_$round.json > $R/deepep_ll_$round.txt 2>&1; echo "exit $?"; row $R/deepep_ll_$round.txt
  done
fi
cd $OUT && tar -czf run24a_${PART}_$N.tgz run24a_${PART}_$N && rm -rf run24a_${PART}_$N
