#!/usr/bin/env bash
# Ninth session: the combine without the own rows' push (each rank's rows to itself are read by the sum where they
# are), from a copy of the repository at the commit that added this script; ab_before/ = a git archive of the
# session's start (3d458f7's code), carried untracked. NPROC ranks (2 or 4).
# 1. correctness: cuda self-test; the harness cuda vs reference and reference vs the executable spec (both modes);
# 2. cuda combine and cached dispatch, before and after alternating, twice per SM budget, back to back.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run9b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
bench() {  # bench TREE BACKEND LABEL [extra...]
  local tree=$1 backend=$2 label=$3; shift 3
  (cd $tree && PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend $backend "${SHAPE[@]}" --json $R/$label.json "$@" > $R/$label.txt 2>&1); echo "=== $label exit $?"
}
for sms in 20 32; do for i in 1 2; do
  bench ab_before cuda before_sms${sms}_$i --num-sms $sms
  bench . cuda after_sms${sms}_$i --num-sms $sms
done; done
if [ "${REF:-1}" = 1 ]; then for i in 1 2; do bench ab_before reference ref_before_$i; bench . reference ref_after_$i; done; fi
bench . cuda after_prof --num-sms 20 --profile $R/profile_after_sms20.txt
for f in $R/before_*.txt $R/after_*.txt $R/ref_*.txt; do echo "--- $f"; grep -E "^normal +(dispatch_cached|combine)" $f | cut -c1-120; done
cd $OUT && tar -czf run9b_$N.tgz run9b_$N && rm -rf run9b_$N
