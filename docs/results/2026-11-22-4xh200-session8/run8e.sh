#!/usr/bin/env bash
# Eighth session, 4xH200: run8d measured the reference's cached dispatch no faster with its rows in one block per
# peer (0.690 / 0.685 ms against 0.674 / 0.667) and its combine faster only where the host kept up (0.575
# against 0.682, but 0.765 in the next round); the dispatch went back to all_to_all_single and the combine keeps
# the blocks. From a copy at the commit that added this script (ab_before/ = 74e8706, untracked):
# the reference vs the executable spec (normal mode), then the reference benchmark, 74e8706 and here
# alternating, three rounds, back to back.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R=$OUT/ref; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
bench() {  # bench TREE LABEL
  (cd $1 && PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/$2.json > $R/$2.txt 2>&1); echo "=== $2 exit $?"
}
for i in 1 2 3; do bench ab_before before_$i; bench . after_$i; done
for f in $R/before_*.txt $R/after_*.txt; do echo "--- $f"; grep -E "^normal +(dispatch|combine)" $f | cut -c1-120; done
cd $OUT && tar -czf ref.tgz ref && rm -rf ref
