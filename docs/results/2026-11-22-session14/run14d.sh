#!/usr/bin/env bash
# Fourteenth session, 4xH200: the first and last rank's cached-dispatch all-to-all on a high-priority stream
# (working tree) against main before it (ab_main/: git archive of b14e7cd's deep_ep and tools, carried untracked):
# 1. harness reference@nccl vs the executable spec vs reference@gloo (CUDA tensors), both modes;
# 2. bench.py 4096 tokens x 7168 bf16, top-8 of 256, back to back: new, before, new, before, new;
# 3. timeline.py on the new code.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
N=${NPROC:-4}
R=$OUT/run14d_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --modes normal,low_latency --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== crosscheck reference"; OMP_NUM_THREADS=4 PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec,reference@cuda/gloo "${PLAN[@]}" > $R/cross_ref.txt 2>&1; echo "exit $?"; tail -n 3 $R/cross_ref.txt
export OMP_NUM_THREADS=1
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
ref() { (cd $1 && PYTHONPATH=. timeout -k 5 80 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/$2.json > $R/$2.txt 2>&1); echo "=== $2 exit $?"; grep -E "^normal +(dispatch_cached|combine|dispatch_cached\+combine) " $R/$2.txt | cut -c1-125; }
ref . ref_new_a; ref ab_main ref_before_a; ref . ref_new_b; ref ab_main ref_before_b; ref . ref_new_c
PYTHONPATH=. timeout -k 5 100 "${RUN[@]}" docs/results/2026-11-22-session14/timeline.py > $R/timeline_new.txt 2>&1; echo "=== timeline_new exit $?"
grep -E "^==|a2a kernel mean|last to start" $R/timeline_new.txt | cut -c1-200
cd $OUT && tar -czf run14d_$N.tgz run14d_$N && rm -rf run14d_$N
