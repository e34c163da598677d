#!/usr/bin/env bash
# Eleventh session, 4xH200, one lease: how much of the reference's normal-mode time is NCCL's all-to-all, under
# NCCL settings a user can choose (the raw all_to_all_single baseline runs under the same setting in each run).
# The reference at 4096 tokens, back to back, once per setting, the default first and last.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
R=$OUT/run11e_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
python3 -c "import torch; print('nccl', torch.cuda.nccl.version())" > $R/nccl_version.txt 2>&1
bench() { local label=$1; shift; env "$@" PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/$label.json > $R/$label.txt 2>&1; echo "=== $label exit $?"; }
bench default X=0
bench min_channels32 NCCL_MIN_NCHANNELS=32
bench chunk1m NCCL_P2P_NVL_CHUNKSIZE=1048576
bench buff16m NCCL_BUFFSIZE=16777216
bench ce_memcpy NCCL_P2P_USE_CUDA_MEMCPY=1
bench proto_simple NCCL_PROTO=Simple
bench default_again X=0
cat $R/nccl_version.txt
for f in default min_channels32 chunk1m buff16m ce_memcpy proto_simple default_again; do echo "--- $f"; grep -E "^normal +(dispatch|dispatch_cached|combine) " $R/$f.txt | cut -c1-100; done
cd $OUT && tar -czf run11e_$N.tgz run11e_$N && rm -rf run11e_$N
