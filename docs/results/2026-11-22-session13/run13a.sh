#!/usr/bin/env bash
# Thirteenth session: the reference backend's all-to-alls that nothing overlaps issued synchronously (torch >= 2.8
# launches them on the current stream: no side stream to join back). Against the code before (ab_before/: git
# archive of 58ebda0, the commit before the change, carried untracked), one lease:
# 1. correctness: harness reference@nccl vs the executable spec vs reference@gloo (CUDA tensors), both modes;
# 2. bench.py 4096 tokens x 7168 bf16, top-8 of 256, back to back: new, before, new, before (agreement check on);
# 3. burst.py (host and device time per call back to back, a profiled burst) for both trees.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run13a_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
echo "cpus: $(nproc)"; python3 -c "import torch; print('torch', torch.__version__)"
PLAN=(--families all --large --modes normal,low_latency --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== crosscheck reference"; PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec,reference@cuda/gloo "${PLAN[@]}" > $R/cross_ref.txt 2>&1; echo "exit $?"; tail -n 3 $R/cross_ref.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
ref() { (cd $1 && PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/$2.json > $R/$2.txt 2>&1); echo "=== $2 exit $?"; grep -E "^normal +(dispatch_cached|combine) " $R/$2.txt | cut -c1-120; }
ref . ref_new_a; ref ab_before ref_before_a; ref . ref_new_b; ref ab_before ref_before_b
burst() { (cd $1 && PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" $OLDPWD/docs/results/2026-11-22-session12/burst.py > $R/$2.txt 2>&1); echo "=== $2 exit $?"; grep -E "^==|unprofiled|bursts of 10" $R/$2.txt; }
burst . burst_new; burst ab_before burst_before
cd $OUT && tar -czf run13a_$N.tgz run13a_$N && rm -rf run13a_$N
