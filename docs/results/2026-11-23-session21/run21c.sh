#!/usr/bin/env bash
# Twenty-first session, 2xH200: after the host-path trims (working tree) against main (80ce2ff, in ab_main/):
# 1. py-spy of the new tree (host_spy.py; py-spy carried in out/), summarised here;
# 2. tools/bench.py back to back at 32 SMs, alternating trees (the figure host pacing shows in);
# 3. session 18's queued_cuda.py (20 calls queued behind a GPU sleep: the device's time per call) for both trees.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}; TAG=${TAG:-c}
R=$OUT/run21${TAG}_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
D=docs/results/2026-11-23-session21
Q=$PWD/docs/results/2026-11-22-session18/queued_cuda.py
git rev-parse HEAD > $R/commit.txt 2>/dev/null; git status --short >> $R/commit.txt; nvidia-smi -L > $R/gpus.txt
chmod +x out/py-spy
echo "=== py-spy"; timeout -k 5 120 out/py-spy record --subprocesses --nonblocking -r 2000 -f raw -o $R/spy.txt -- "${RUN[@]}" $D/host_spy.py > $R/sampled.txt 2>&1; echo "exit $?"
python3 $D/spy_summary.py $R/spy.txt > $R/spy_summary.txt && rm $R/spy.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back --num-sms 32)
for i in 1 2; do
  for tree in ab_main .; do
    name=$([ $tree = . ] && echo new || echo main)
    (cd $tree && PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --json $R/bench_${name}_$i.json > $R/bench_${name}_$i.txt 2>&1)
    echo "--- bench $name $i"; grep -E "^normal +(dispatch_cached|combine) " $R/bench_${name}_$i.txt | cut -c1-130
  done
done
for tree in ab_main .; do
  name=$([ $tree = . ] && echo new || echo main)
  (cd $tree && timeout -k 5 120 "${RUN[@]}" $Q > $R/queued_${name}.txt 2>&1)
  echo "--- queued $name"; tail -6 $R/queued_${name}.txt
done
cd $OUT && tar -czf run21${TAG}_$N.tgz run21${TAG}_$N && rm -rf run21${TAG}_$N
