#!/usr/bin/env bash
# Thirteenth session, 4xH200 (a container with 4 CPUs): the reference's cached dispatch + combine with the OpenMP
# threads per rank at 4 (the earlier scripts' setting) and at 1 (torchrun's default), agreement check on and off.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
N=${NPROC:-4}
R=$OUT/run13d_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
echo "cpus: $(nproc)"
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
ref() { OMP_NUM_THREADS=$2 PYTHONPATH=. timeout -k 5 80 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/$1.json "${@:3}" > $R/$1.txt 2>&1; echo "=== $1 exit $?"; grep -E "^normal +(dispatch_cached|combine|dispatch_cached\+combine) " $R/$1.txt | cut -c1-125; }
ref omp4_check 4; ref omp1_check 1; ref omp1_nocheck 1 --no-agreement-check; ref omp4_check_again 4; ref omp1_check_again 1
cd $OUT && tar -czf run13d_$N.tgz run13d_$N && rm -rf run13d_$N
