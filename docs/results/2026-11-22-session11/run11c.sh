#!/usr/bin/env bash
# Eleventh session, 4xH200, one lease: the reference backend's dispatch rows in R - 1 all-to-all steps (each a
# balanced shift: rank r sends to r + k, receives from r - k), the next step's rows gathered while one travels.
# 1. correctness: harness reference over NCCL vs the executable spec and cuda vs reference (normal mode);
# 2. the reference, 4096 tokens, back to back: REF_STEPS= (one all-to-all, the code before) / cuda (steps),
#    alternating, three rounds; one profiled run of each.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
D=docs/results/2026-11-22-session11
R=$OUT/run11c_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
bench() {  # bench STEPS LABEL [extra...]
  local steps=$1 label=$2; shift 2
  REF_STEPS=$steps PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" $D/steps.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/$label.json "$@" > $R/$label.txt 2>&1; echo "=== $label exit $?"
}
bench "" one_a; bench cuda steps_a; bench "" one_b; bench cuda steps_b; bench "" one_c; bench cuda steps_c
bench cuda steps_prof --iters 10 --warmup 3 --profile $R/profile_steps.txt
bench "" one_prof --iters 10 --warmup 3 --profile $R/profile_one.txt
for f in $R/one_?.txt $R/steps_?.txt; do echo "--- $f"; grep -E "^normal +(dispatch|dispatch_cached|combine) " $f | cut -c1-110; done
cd $OUT && tar -czf run11c_$N.tgz run11c_$N && rm -rf run11c_$N
