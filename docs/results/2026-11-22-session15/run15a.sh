#!/usr/bin/env bash
# Fifteenth session, 4xH200: the own-row gather on few SMs. own_rows_few_sms.py (4 ranks), the harness on the new
# tree (reference@nccl vs the executable spec vs reference@gloo), then bench.py back to back at 4096 x 7168 bf16,
# top-8 of 256, the working tree (new) alternating with ab_main/ (git archive of main's deep_ep and tools, carried
# untracked) as ORDER lists them.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
N=${NPROC:-4}
R=$OUT/run15a_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
P=docs/results/2026-11-22-session15/own_rows_few_sms.py
[ -n "${PROBE-1}" ] && PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" $P > $R/own_rows.txt 2>&1; echo "=== own_rows exit $?"; grep -v Warning $R/own_rows.txt | grep -E "SMs|select|MISMATCH|ranks" | tail -n 12
PLAN=(--families all --large --modes normal,low_latency --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
if [ -n "${CROSS-1}" ]; then
PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec,reference@cuda/gloo "${PLAN[@]}" > $R/cross_ref.txt 2>&1; echo "=== crosscheck exit $?"; tail -n 3 $R/cross_ref.txt
fi
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
ref() { (cd $1 && PYTHONPATH=. timeout -k 5 80 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/$2.json > $R/$2.txt 2>&1); echo "=== $2 exit $?"; grep -E "^normal +(dispatch_cached|combine|dispatch_cached\+combine) " $R/$2.txt | cut -c1-125; }
i=0; for tree in ${ORDER-new before new before}; do i=$((i+1)); if [ $tree = new ]; then ref . new_$i; else ref ab_main before_$i; fi; done
