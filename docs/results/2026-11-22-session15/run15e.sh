#!/usr/bin/env bash
# Fifteenth session, 4xH200: bench.py back to back at 4096 x 7168 bf16, top-8 of 256, the working tree (new)
# alternating with ab_main/ (main before the few-SM own-row gather) as ORDER lists them.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
N=${NPROC:-4}
R=$OUT/run15e_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
ref() { (cd $1 && PYTHONPATH=. timeout -k 5 80 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/$2.json > $R/$2.txt 2>&1); echo "=== $2 exit $?"; grep -E "^normal +(dispatch_cached|combine|dispatch_cached\+combine) " $R/$2.txt | cut -c1-125; }
i=0; for tree in ${ORDER:-new before new before new before}; do i=$((i+1)); if [ $tree = new ]; then ref . new_$i; else ref ab_main before_$i; fi; done
cd $OUT && tar -czf run15e_$N.tgz run15e_$N && rm -rf run15e_$N
