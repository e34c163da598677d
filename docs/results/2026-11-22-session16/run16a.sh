#!/usr/bin/env bash
# Sixteenth session, 4xH200, part 1: the fifteenth session's transfer probe (own_rows_few_sms.py, incl. the
# `list, ...` variants in which the middle ranks' own rows stay home too), then the harness (reference@nccl vs the
# executable spec vs reference@gloo) on main (new) and on ab_mid/ (branch middle-ranks-2: every rank's own rows
# home, list all-to-all on NCCL with 3+ ranks, own rows gathered by the few-SM kernel).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
N=${NPROC:-4}
R=$OUT/run16a_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
P=docs/results/2026-11-22-session15/own_rows_few_sms.py
PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" $P > $R/own_rows.txt 2>&1; echo "=== own_rows exit $?"; grep -E "^  |MISMATCH|bytes" $R/own_rows.txt
PLAN=(--families all --large --modes normal,low_latency --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
cross() { (cd $1 && PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec,reference@cuda/gloo "${PLAN[@]}" > $R/$2.txt 2>&1); echo "=== $2 exit $?"; tail -n 2 $R/$2.txt; }
cross . cross_new
cross ab_mid cross_mid
cd $OUT && tar -czf run16a_$N.tgz run16a_$N && rm -rf run16a_$N
