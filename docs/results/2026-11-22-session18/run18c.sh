#!/usr/bin/env bash
# Eighteenth session, 2xH200: the cuda backend at 32 SMs, back to back, with and without the façade's per-call
# agreement check (host_profile.py showed the host's time per combine, 385 us, above the device's ~224 us in this
# container), alternating, two rounds.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run18c_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back --num-sms 32)
for i in 1 2; do
  for variant in checked unchecked; do
    extra=(); [ $variant = unchecked ] && extra=(--no-agreement-check)
    PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" "${extra[@]}" --json $R/${variant}_$i.json > $R/${variant}_$i.txt 2>&1; echo "=== ${variant}_$i exit $?"
  done
done
for f in $R/*_?.txt; do echo "--- $(basename $f)"; grep -E "^normal +(dispatch_cached|combine) " $f | cut -c1-130; done
cd $OUT && tar -czf run18c_$N.tgz run18c_$N && rm -rf run18c_$N
