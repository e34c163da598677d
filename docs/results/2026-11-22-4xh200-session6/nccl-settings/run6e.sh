#!/usr/bin/env bash
# Session 6, device run E (4xH200): NCCL settings and the all-to-all the reference backend rides on.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R="$OUT/r"; mkdir -p "$R"
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
BENCH=(tools/bench.py --launcher torchrun --dist-backend nccl --mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bf16 --iters 30 --warmup 10 --quiet --backend reference --timing back-to-back)
v() { local name=$1 envs=$2
  (env $envs timeout -k 5 60 "${RUN[@]}" "${BENCH[@]}" --json "$R/$name.json" > "$R/$name.txt" 2>&1); echo "=== $name ($envs) exit $?"
  grep -E "^normal +(dispatch|combine)" "$R/$name.txt"; }
{
date -u; python3 -c "import torch; print('nccl', torch.cuda.nccl.version())"
v default X=1
v chunk1m NCCL_P2P_NVL_CHUNKSIZE=1048576
v p2pch32 "NCCL_MIN_P2P_NCHANNELS=32 NCCL_MIN_NCHANNELS=32"
v cememcpy NCCL_P2P_USE_CUDA_MEMCPY=1
v default2 X=1
} 2>&1 | tee "$R/log.txt"
tar -czf "$OUT/run6e.tgz" -C "$OUT" r && rm -rf "$R"
