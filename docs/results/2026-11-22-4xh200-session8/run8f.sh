#!/usr/bin/env bash
# Eighth session, 4xH200: the fp8 cached dispatch's device time, pull (here) against push (74e8706, ab_before/),
# since its back-to-back figures in run8c/run8d were paced by the host: tools/bench.py --profile profiles the
# cached dispatch of the first --dtype (fp8), 20 SMs, rank 0; back-to-back figures of the same runs too.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R=$OUT/fp8; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype fp8 bfloat16 --iters 30 --warmup 10 --timing back-to-back --num-sms 20)
for t in "ab_before before" ". after"; do set -- $t
  (cd $1 && PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --profile $R/profile_$2.txt > $R/$2.txt 2>&1); echo "=== $2 exit $?"
done
for f in $R/before.txt $R/after.txt; do echo "--- $f"; grep -E "^normal +(dispatch|combine)" $f | cut -c1-120; grep -A6 "timeline per call" $f | head -8; done
cd $OUT && tar -czf fp8.tgz fp8 && rm -rf fp8
