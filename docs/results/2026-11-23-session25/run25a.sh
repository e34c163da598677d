#!/usr/bin/env bash
# Twenty-fifth session, 2xH200: where a cuda fresh dispatch's host time goes at the session's start (host time per
# phase, and py-spy leaves). Needs out/py-spy.xz (the py-spy 0.4.3 wheel's binary, xz-compressed; carry out/).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run25a_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
D=docs/results/2026-11-23-session25
nvidia-smi -L > $R/machine.txt; nproc --all >> $R/machine.txt; git log -1 --format=%H >> $R/machine.txt 2>/dev/null
for i in 1 2; do
  echo "=== phases $i"; timeout -k 5 120 "${RUN[@]}" $D/fresh_phases.py > $R/phases_$i.txt 2>&1; echo "exit $?"; grep -v "^W1" $R/phases_$i.txt | head -30
done
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('out/py-spy.xz'), open('/tmp/py-spy', 'wb'))"; chmod +x /tmp/py-spy
echo "=== py-spy"; OPS=fresh SECONDS_PER_OP=4 timeout -k 5 120 /tmp/py-spy record --subprocesses --nonblocking -r 2000 -f raw -o $R/spy.txt -- "${RUN[@]}" docs/results/2026-11-23-session21/host_spy.py > $R/sampled.txt 2>&1; echo "exit $?"
python3 docs/results/2026-11-23-session21/spy_summary.py $R/spy.txt > $R/spy_summary.txt && rm $R/spy.txt
grep -A90 "op_fresh_dispatch" $R/spy_summary.txt | head -95
