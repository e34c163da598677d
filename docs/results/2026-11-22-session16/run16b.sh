#!/usr/bin/env bash
# Sixteenth session, 4xH200, part 2: the library's cached dispatch and combine for three trees, alternating as
# ORDER lists them: new (main: first/last rank's own rows on 16 SMs), before (ab_main/: main at dd1fedd), mid
# (ab_mid/: branch middle-ranks-2). STEP=queued: queued.py (device time alone, and as issued; bits checked with
# DEEP_EP_TRITON=0); STEP=bench: bench.py back to back (DeepEP's figure).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
N=${NPROC:-4}
STEP=${STEP:-queued}
R=$OUT/run16b_${STEP}_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
Q=$PWD/docs/results/2026-11-22-session15/queued.py
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
tree_dir() { case $1 in new) echo .;; before) echo ab_main;; mid) echo ab_mid;; esac; }
one() {
  if [ $STEP = queued ]; then
    (cd $(tree_dir $1) && PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" $Q > $R/$2.txt 2>&1); echo "=== $2 exit $?"; grep -E "^  |same bits|MISMATCH" $R/$2.txt
  else
    (cd $(tree_dir $1) && PYTHONPATH=. timeout -k 5 80 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/$2.json > $R/$2.txt 2>&1); echo "=== $2 exit $?"; grep -E "^normal +(dispatch_cached|combine|dispatch_cached\+combine) " $R/$2.txt | cut -c1-125
  fi
}
i=0; for tree in ${ORDER-new before mid new before mid}; do i=$((i+1)); one $tree ${tree}_$i; done
cd $OUT && tar -czf run16b_${STEP}_$N.tgz run16b_${STEP}_$N && rm -rf run16b_${STEP}_$N
