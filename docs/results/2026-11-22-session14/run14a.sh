#!/usr/bin/env bash
# Fourteenth session, 4xH200: every rank's device timeline of the reference's cached dispatch and combine back to
# back (timeline.py), agreement check on and off, then bench.py's figures for the same shapes.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
N=${NPROC:-4}
R=$OUT/run14a_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
echo "cpus: $(nproc)"; nvidia-smi --query-gpu=name --format=csv,noheader | head -1
T=docs/results/2026-11-22-session14/timeline.py
PYTHONPATH=. timeout -k 5 100 "${RUN[@]}" $T > $R/timeline_check.txt 2>&1; echo "=== timeline_check exit $?"
NO_CHECK=1 PYTHONPATH=. timeout -k 5 100 "${RUN[@]}" $T > $R/timeline_nocheck.txt 2>&1; echo "=== timeline_nocheck exit $?"
grep -E "^==|a2a kernel mean|last to start" $R/timeline_*.txt | cut -c1-200
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
PYTHONPATH=. timeout -k 5 100 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/ref.json > $R/ref.txt 2>&1; echo "=== ref exit $?"
grep -E "^normal +(dispatch_cached|combine|dispatch_cached\+combine) " $R/ref.txt | cut -c1-125
tail -n 5 $R/timeline_check.txt | cut -c1-300
cd $OUT && tar -czf run14a_$N.tgz run14a_$N && rm -rf run14a_$N
