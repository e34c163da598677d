#!/usr/bin/env bash
# Eighteenth session, 2xH200 (no 4-GPU machine lent): re-verify the cuda backend at this commit (its last full
# harness run was the thirteenth session's; routing, the ordered sums and the row gather changed since), then
# time it and the reference beside upstream DeepEP in one lease.
# 1. correctness: cuda self-test; harness cuda vs reference (both modes, every family); reference vs the spec;
# 2. normal mode at 4096 x 7168 bf16, top-8 of 256, back to back: reference, cuda at 20 / 32 SMs, upstream at 20 / 32;
# 3. low-latency kernel times at T = 128 (cuda, upstream).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
STEP=${STEP:-check}  # check: 1 and 2; ll: 3 and the second reference / cuda runs
R=$OUT/run18a_${STEP}_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
git rev-parse HEAD > $R/commit.txt 2>/dev/null; nvidia-smi -L > $R/gpus.txt
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl > $R/pip.txt 2>&1
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
bench() {  # bench BACKEND LABEL [extra...]
  local backend=$1 label=$2; shift 2
  PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend $backend "${SHAPE[@]}" --json $R/$label.json "$@" > $R/$label.txt 2>&1; echo "=== $label exit $?"
}
upstream() {  # upstream LABEL [extra...]
  local label=$1; shift
  env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 90 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "$@" --json $R/$label.json > $R/$label.txt 2>&1; echo "=== $label exit $?"
}
if [ $STEP = check ]; then
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" --json $R/cross_cuda.json > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal,low_latency "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt
bench reference reference_1; bench cuda cuda_sms20 --num-sms 20; bench cuda cuda_sms32 --num-sms 32
upstream upstream_sms20 "${SHAPE[@]}" --num-sms 20; upstream upstream_sms32 "${SHAPE[@]}" --num-sms 32
else
bench reference reference_2; bench cuda cuda_sms32_again --num-sms 32
LL=(--mode ll --ll-tokens 128 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph --ll-kernel-times)
PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/cuda_ll.json > $R/cuda_ll.txt 2>&1; echo "=== cuda_ll exit $?"
upstream upstream_ll "${LL[@]}"
fi
for f in $R/reference_*.txt $R/cuda_sms*.txt $R/upstream_sms*.txt; do echo "--- $(basename $f)"; grep -E "^normal +(dispatch|dispatch_cached|combine|dispatch_cached\+combine) " $f | cut -c1-130; done
for f in $R/cuda_ll.txt $R/upstream_ll.txt; do echo "--- $(basename $f)"; grep -E "^ll " $f | cut -c1-130; grep -i "kernel" $f | head -12; done
cd $OUT && tar -czf run18a_${STEP}_$N.tgz run18a_${STEP}_$N && rm -rf run18a_${STEP}_$N
