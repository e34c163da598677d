#!/usr/bin/env bash
# Thirteenth session, 4xH200: the reference with every rank's own rows home (branch middle-ranks, 9016ec5)
# against main before it (ab_main/: git archive of 3883d47, carried untracked), one lease:
# 1. correctness: harness reference@nccl vs the executable spec vs reference@gloo (CUDA tensors), both modes;
# 2. bench.py 4096 tokens x 7168 bf16, top-8 of 256, back to back: new, before, new, before;
# 3. burst.py for both trees (host and device time per call, a profiled burst).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
R=$OUT/run13b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
echo "cpus: $(nproc)"; python3 -c "import torch; print('torch', torch.__version__)"
PLAN=(--families all --large --modes normal,low_latency --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== crosscheck reference"; PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec,reference@cuda/gloo "${PLAN[@]}" > $R/cross_ref.txt 2>&1; echo "exit $?"; tail -n 3 $R/cross_ref.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
ref() { (cd $1 && PYTHONPATH=. timeout -k 5 80 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/$2.json > $R/$2.txt 2>&1); echo "=== $2 exit $?"; grep -E "^normal +(dispatch_cached|combine|dispatch_cached\+combine) " $R/$2.txt | cut -c1-125; }
ref . ref_new_a; ref ab_main ref_before_a; ref . ref_new_b; ref ab_main ref_before_b
burst() { (cd $1 && PYTHONPATH=. timeout -k 5 80 "${RUN[@]}" $OLDPWD/docs/results/2026-11-22-session12/burst.py > $R/$2.txt 2>&1); echo "=== $2 exit $?"; grep -E "^==|unprofiled|bursts of 10" $R/$2.txt | cut -c1-160; }
burst . burst_new; burst ab_main burst_before
cd $OUT && tar -czf run13b_$N.tgz run13b_$N && rm -rf run13b_$N
