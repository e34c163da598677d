#!/usr/bin/env bash
# Fourteenth session, 4xH200: copy-engine peer copies against NCCL's all-to-all (copy_engine_probe.py), 53 MB
# blocks (a 4096-token call's rows per peer) and 20 MB blocks.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
N=${NPROC:-4}
R=$OUT/run14b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
P=docs/results/2026-11-22-session14/copy_engine_probe.py
PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" $P > $R/probe_53.txt 2>&1; echo "=== probe_53 exit $?"; grep -v Warning $R/probe_53.txt | tail -n 14
BLOCK_MB=20 PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" $P > $R/probe_20.txt 2>&1; echo "=== probe_20 exit $?"; grep -v Warning $R/probe_20.txt | tail -n 14
nvidia-smi topo -m > $R/topo.txt 2>&1; head -8 $R/topo.txt
