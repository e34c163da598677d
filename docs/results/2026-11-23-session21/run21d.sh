#!/usr/bin/env bash
# Twenty-first session, 2xH200: where a fresh dispatch of the cuda backend spends its time (1.35-1.68 ms back to
# back in the nineteenth session, DeepEP 0.32 at 32 SMs): host time per call, py-spy of it, torch.profiler tables.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}; TAG=${TAG:-d}
R=$OUT/run21${TAG}_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
D=docs/results/2026-11-23-session21
git rev-parse HEAD > $R/commit.txt 2>/dev/null; git status --short >> $R/commit.txt; nvidia-smi -L > $R/gpus.txt
echo "=== unsampled"; OPS=fresh,cached,combine SECONDS_PER_OP=2 timeout -k 5 90 "${RUN[@]}" $D/host_spy.py > $R/unsampled.txt 2>&1; echo "exit $?"; grep "host per call" $R/unsampled.txt
chmod +x out/py-spy
echo "=== py-spy"; OPS=fresh timeout -k 5 120 out/py-spy record --subprocesses --nonblocking -r 2000 -f raw -o $R/spy.txt -- "${RUN[@]}" $D/host_spy.py > $R/sampled.txt 2>&1; echo "exit $?"
python3 $D/spy_summary.py $R/spy.txt > $R/spy_summary.txt && rm $R/spy.txt
echo "=== profile"; TRACE_DIR=$R timeout -k 5 120 "${RUN[@]}" $D/fresh_profile.py > $R/profile.txt 2>&1; echo "exit $?"; head -40 $R/profile.txt | cut -c1-200
cd $OUT && tar -czf run21${TAG}_$N.tgz run21${TAG}_$N && rm -rf run21${TAG}_$N
