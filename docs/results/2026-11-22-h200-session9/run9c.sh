#!/usr/bin/env bash
# Ninth session: three versions of the cuda backend side by side with upstream DeepEP, one lease, NPROC ranks:
#   ab_before/ = 3d458f7's code (the session's start), ab_own/ = the combine that leaves the own rows in place
#   (its push tiles 8192 words, 8 warps), . = the commit that added this script (push tiles 16384 words, 16 warps).
# ab_*/ are git archives carried untracked. TREES, ROUNDS (2), REF=1 (the reference backend too), HB=1
# (tools/host_breakdown.py with the agreement check) pick what runs. Correctness of '.' first (self-test, harness cuda vs reference).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
R=$OUT/run9c_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
[ $N = 4 ] && { echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt; }
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
bench() {  # bench TREE BACKEND LABEL [extra...]
  local tree=$1 backend=$2 label=$3; shift 3
  (cd $tree && PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend $backend "${SHAPE[@]}" --json $R/$label.json "$@" > $R/$label.txt 2>&1); echo "=== $label exit $?"
}
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
deepep() { env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 60 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "${SHAPE[@]}" --num-sms $1 --json $R/deepep_sms$1.json > $R/deepep_sms$1.txt 2>&1; echo "=== deepep sms=$1 exit $?"; }
TREES=${TREES:-"ab_before ab_own ."}
name() { [ "$1" = . ] && echo tile || echo ${1#ab_}; }
for sms in 20 32; do
  deepep $sms
  for i in $(seq ${ROUNDS:-2}); do for t in $TREES; do bench $t cuda $(name $t)_sms${sms}_$i --num-sms $sms; done; done
done
deepep 64
[ "${REF:-0}" = 1 ] && bench . reference ref_after
[ "${HB:-0}" = 1 ] && { CHECK=1 PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/host_breakdown.py > $R/host_breakdown_check1.txt 2>&1; echo "=== host_breakdown exit $?"; }
bench . cuda prof --num-sms 20 --profile $R/profile_sms20.txt
for f in $R/deepep_*.txt $R/before_*.txt $R/own_*.txt $R/tile_*.txt $R/ref_*.txt; do echo "--- $f"; grep -E "^normal +(dispatch_cached|combine)" $f | cut -c1-120; done
cd $OUT && tar -czf run9c_$N.tgz run9c_$N && rm -rf run9c_$N
