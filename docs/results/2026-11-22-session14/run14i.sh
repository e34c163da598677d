#!/usr/bin/env bash
# Fourteenth session, 4xH200: the NCCL group created with is_high_priority_stream=True (high_priority_group.py,
# no library change) against the default group: own_rows_bench.py, harness, bench.py at 4 ranks (alternating) and
# at 2 ranks (2 of the GPUs).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
R=$OUT/run14i; mkdir -p $R
HP=docs/results/2026-11-22-session14/high_priority_group.py
run() { n=$1; shift; PYTHONPATH=. timeout -k 5 150 python3 -m torch.distributed.run --standalone --nproc-per-node $n "$@"; }
O=docs/results/2026-11-22-session14/own_rows_bench.py
run 4 $HP $O > $R/own_rows_hp.txt 2>&1; echo "=== own_rows_hp exit $?"; grep -E "^  main |^  list " $R/own_rows_hp.txt
PLAN=(--families all --large --modes normal,low_latency --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
run 4 $HP tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec,reference@cuda/gloo "${PLAN[@]}" > $R/cross_ref_hp.txt 2>&1; echo "=== cross_ref_hp exit $?"; tail -n 2 $R/cross_ref_hp.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
B=(tools/bench.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}")
ref() { n=$1; name=$2; shift 2; run $n "$@" "${B[@]}" --json $R/$name.json > $R/$name.txt 2>&1; echo "=== $name exit $?"; grep -E "^normal +(dispatch_cached|combine|dispatch_cached\+combine) " $R/$name.txt | cut -c1-125; }
ref 4 hp_1 $HP; ref 4 default_2; ref 4 hp_3 $HP; ref 4 default_4; ref 4 hp_5 $HP
ref 2 hp2_1 $HP; ref 2 default2_2; ref 2 hp2_3 $HP
cd $OUT && tar -czf run14i.tgz run14i && rm -rf run14i
