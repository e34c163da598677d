#!/usr/bin/env bash
# Session 6, device run D (4xH200): the cached combine row index and the in-place ordered sum, on hardware;
# before (c5424cc tree in ab_before/) and after, reference and cuda, back to back and from an idle device.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R="$OUT/r"; mkdir -p "$R"
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
BENCH=(tools/bench.py --launcher torchrun --dist-backend nccl --mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bf16 --iters 30 --warmup 10 --quiet)
{
date -u
echo "=== selftest"; timeout -k 5 150 python3 tools/cuda_selftest.py --world 4 > "$R/selftest.txt" 2>&1; echo "exit $?"; tail -2 "$R/selftest.txt"
echo "=== crosscheck"; timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --families all --large --modes normal,low_latency --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60 > "$R/crosscheck.txt" 2>&1; echo "exit $?"; tail -2 "$R/crosscheck.txt"
for round in 1 2; do
  for backend in reference cuda; do
    for tree in before after; do
      dir=.; [ $tree = before ] && dir=ab_before
      name="${backend}_${tree}_b2b_$round"
      (cd $dir && timeout -k 5 90 "${RUN[@]}" "${BENCH[@]}" --backend $backend --timing back-to-back --json "$R/$name.json" > "$R/$name.txt" 2>&1); echo "=== $name exit $?"
      grep -E "^normal +(dispatch|combine)" "$R/$name.txt"
    done
  done
done
} 2>&1 | tee "$R/log.txt"
tar -czf "$OUT/run6d.tgz" -C "$OUT" r && rm -rf "$R"
