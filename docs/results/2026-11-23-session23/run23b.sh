#!/usr/bin/env bash
# Twenty-third session, 2xH200: where the fresh dispatch's host time goes after the three kernels (py-spy of the
# fresh dispatch issued back to back, the twenty-first session's host_spy.py and spy_summary.py). Needs out/py-spy
# .xz (the py-spy 0.4.3 wheel's binary, xz-compressed to fit the carry limit; carry out/).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run23b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
D=docs/results/2026-11-23-session21
echo "=== unsampled"; OPS=fresh SECONDS_PER_OP=3 timeout -k 5 90 "${RUN[@]}" $D/host_spy.py > $R/unsampled.txt 2>&1; echo "exit $?"; grep "host per call" $R/unsampled.txt
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('out/py-spy.xz'), open('/tmp/py-spy', 'wb'))"; chmod +x /tmp/py-spy
echo "=== py-spy"; OPS=fresh SECONDS_PER_OP=4 timeout -k 5 120 /tmp/py-spy record --subprocesses --nonblocking -r 2000 -f raw -o $R/spy.txt -- "${RUN[@]}" $D/host_spy.py > $R/sampled.txt 2>&1; echo "exit $?"
python3 $D/spy_summary.py $R/spy.txt > $R/spy_summary.txt && rm $R/spy.txt
sed -n 1,200p $R/spy_summary.txt | grep -A60 "op_fresh_dispatch" | head -100
