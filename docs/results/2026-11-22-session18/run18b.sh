#!/usr/bin/env bash
# Eighteenth session, 2xH200: the cuda backend's normal mode at 32 SMs, four back-to-back runs in one lease (run18a
# gave the combine 502 and 518 GB/s against issue 8's 520: is that the kernel or the host?), each with host_breakdown's
# per-call host time of the cached dispatch and the combine after it.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run18b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
for i in 1 2 3 4; do
  PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --num-sms 32 --json $R/cuda_sms32_$i.json > $R/cuda_sms32_$i.txt 2>&1; echo "=== cuda_sms32_$i exit $?"
done
CHECK=1 PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/host_breakdown.py > $R/host_breakdown.txt 2>&1; echo "=== host_breakdown exit $?"
for f in $R/cuda_sms32_*.txt; do echo "--- $(basename $f)"; grep -E "^normal +(dispatch_cached|combine) " $f | cut -c1-130; done
grep -E "back to back|TOTAL|ordered_gather_sum|triton launch|barrier|agreement" $R/host_breakdown.txt | head -30
cd $OUT && tar -czf run18b_$N.tgz run18b_$N && rm -rf run18b_$N
