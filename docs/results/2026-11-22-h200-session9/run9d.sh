#!/usr/bin/env bash
# Ninth session, 2xH200: the session's last code (the commit that added this script), one lease:
# 1. correctness: cuda self-test; the harness cuda vs reference (both modes) and reference vs the executable spec;
# 2. upstream DeepEP at 20 / 32 / 64 SMs and the cuda backend at 20 / 32 SMs (two rounds), back to back (DeepEP's
#    tests' timing), checks on; then the cuda backend without the per-call agreement check (DeepEP has none);
# 3. tools/host_breakdown.py with the agreement check (the host's time per call).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run9d_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
bench() {  # bench LABEL [extra...]
  local label=$1; shift
  PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --json $R/$label.json "$@" > $R/$label.txt 2>&1; echo "=== $label exit $?"
}
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
deepep() { env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 60 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "${SHAPE[@]}" --num-sms $1 --json $R/deepep_sms$1.json > $R/deepep_sms$1.txt 2>&1; echo "=== deepep sms=$1 exit $?"; }
for sms in 20 32; do deepep $sms; bench cuda_sms${sms}_1 --num-sms $sms; bench cuda_sms${sms}_2 --num-sms $sms; done
deepep 64
for sms in 20 32; do bench unchecked_sms$sms --num-sms $sms --no-agreement-check; done
CHECK=1 PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/host_breakdown.py > $R/host_breakdown_check1.txt 2>&1; echo "=== host_breakdown exit $?"
for f in $R/deepep_*.txt $R/cuda_*.txt $R/unchecked_*.txt; do echo "--- $f"; grep -E "^normal +(dispatch_cached|combine)" $f | cut -c1-120; done
cd $OUT && tar -czf run9d_$N.tgz run9d_$N && rm -rf run9d_$N
