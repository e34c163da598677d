#!/usr/bin/env bash
# Eighth session, 4xH200, the session's last code, from a copy of the repository at the commit that added this
# script (ab_before/ = a git archive of 74e8706, the session's start, untracked; .whl/ carried):
# 1. correctness: cuda self-test; the harness cuda vs reference (both modes) and reference vs the executable
#    spec (both modes: the reference's normal mode now moves one block per peer on NCCL);
# 2. the reference backend, 74e8706 and here alternating, twice, back to back (issue 7's GPU target);
# 3. upstream DeepEP and the cuda backend for each SM budget, back to back, in the same lease.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R=$OUT/final; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== selftest"; PYTHONPATH=. timeout -k 5 200 python3 tools/cuda_selftest.py --world 4 > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal,low_latency "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back)
bench() {  # bench TREE BACKEND LABEL [extra...]
  local tree=$1 backend=$2 label=$3; shift 3
  (cd $tree && PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend $backend "${SHAPE[@]}" --json $R/$label.json "$@" > $R/$label.txt 2>&1); echo "=== $label exit $?"
}
for i in 1 2; do bench ab_before reference reference_before_$i; bench . reference reference_after_$i; done
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
for sms in 20 32 64; do
  env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 60 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "${SHAPE[@]}" --num-sms $sms --json $R/deepep_sms$sms.json > $R/deepep_sms$sms.txt 2>&1; echo "=== deepep sms=$sms exit $?"
  bench . cuda cuda_sms$sms --num-sms $sms
done
for f in $R/reference_*.txt $R/deepep_*.txt $R/cuda_*.txt; do echo "--- $f"; grep -E "^normal +(dispatch|combine)" $f | cut -c1-120; done
cd $OUT && tar -czf final.tgz final && rm -rf final
