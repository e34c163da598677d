#!/usr/bin/env bash
# Tenth session, 4xH200, one lease: launch constants of the low-latency kernels (ROW_WARPS = 4 is now the
# default; run10c found 4 warps faster than 8 and 16), T=128 x 7168, top-8 of 256, bf16 and fp8, back to back.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
D=docs/results/2026-11-22-h200-session10
R=$OUT/run10d_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
LL=(--mode ll --ll-tokens 128 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph --ll-kernel-times)
variant() {  # variant LABEL CONSTANTS [extra...]
  local label=$1 constants=$2; shift 2
  LL_VARIANT=$constants PYTHONPATH=. timeout -k 5 75 "${RUN[@]}" $D/variant.py --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/$label.json "$@" > $R/$label.txt 2>&1; echo "=== $label exit $?"
}
variant warps4 "" --profile $R/warps4_kernels.txt
variant warps2 ROW_WARPS=2
variant warps4_pps16 PROGRAMS_PER_SM=16
variant warps4_pps4 PROGRAMS_PER_SM=4
variant warps2_pps16 ROW_WARPS=2,PROGRAMS_PER_SM=16
variant warps4_block1024 ROW_BLOCK_WORDS=1024
variant warps4_again ""
for f in $R/warps*.txt; do echo "--- $f"; grep -E "^ll +(graph|kernels)" $f | cut -c1-22,58-100; done
cd $OUT && tar -czf run10d_$N.tgz run10d_$N && rm -rf run10d_$N
