#!/usr/bin/env bash
# Fifteenth session: queued.py (the library's cached dispatch and combine, device time alone and as issued) for
# the working tree (new) and ab_main/ (main before this change), alternating, on NPROC GPUs.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
N=${NPROC:-4}
R=$OUT/run15d_$N; mkdir -p $R
Q=$PWD/docs/results/2026-11-22-session15/queued.py
q() { (cd $1 && PYTHONPATH=. timeout -k 5 120 python3 -m torch.distributed.run --standalone --nproc-per-node $N $Q > $R/$2.txt 2>&1); echo "=== $2 exit $?"; grep -E "^  |same bits|MISMATCH" $R/$2.txt; }
i=0; for tree in ${ORDER:-new before new before}; do i=$((i+1)); if [ $tree = new ]; then q . new_$i; else q ab_main before_$i; fi; done
cd $OUT && tar -czf run15d_$N.tgz run15d_$N && rm -rf run15d_$N
