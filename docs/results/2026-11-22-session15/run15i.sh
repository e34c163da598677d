#!/usr/bin/env bash
# Fifteenth session, 4xH200: own_rows_few_sms.py (4 ranks), the harness on the working tree (reference@nccl vs the
# executable spec vs reference@gloo), then queued.py for the working tree (new) and ab_main/ (before) alternating.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
N=${NPROC:-4}
R=$OUT/run15i_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
P=docs/results/2026-11-22-session15/own_rows_few_sms.py
PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" $P > $R/own_rows.txt 2>&1; echo "=== own_rows exit $?"; grep -E "^  |MISMATCH" $R/own_rows.txt
PLAN=(--families all --large --modes normal,low_latency --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec,reference@cuda/gloo "${PLAN[@]}" > $R/cross_ref.txt 2>&1; echo "=== crosscheck exit $?"; tail -n 2 $R/cross_ref.txt
Q=$PWD/docs/results/2026-11-22-session15/queued.py
q() { (cd $1 && PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" $Q > $R/$2.txt 2>&1); echo "=== $2 exit $?"; grep -E "^  |same bits|MISMATCH" $R/$2.txt; }
i=0; for tree in ${ORDER-new before new before}; do i=$((i+1)); if [ $tree = new ]; then q . queued_new_$i; else q ab_main queued_before_$i; fi; done
cd $OUT && tar -czf run15i_$N.tgz run15i_$N && rm -rf run15i_$N
