#!/usr/bin/env bash
# Seventh session, 4xH200, second lease: tools/host_breakdown.py (agreement check on) before (f9bfb46, ab_before/)
# and after, alternating, twice; then back to back at 4096 x 7168, bf16 and fp8, upstream DeepEP (.whl carried)
# and the cuda backend at 20 / 32 / 64 SMs.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
for i in 1 2; do
  (cd ab_before && CHECK=1 PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" tools/host_breakdown.py > $R/hb_before_$i.txt 2>&1); echo "=== hb before $i exit $?"
  CHECK=1 PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" tools/host_breakdown.py > $R/hb_after_$i.txt 2>&1; echo "=== hb after $i exit $?"
done
python3 -m pip install -q --no-index --no-deps --target /tmp/upstream .whl/tokenspeed_deepep-*.whl
NVSHMEM_LIB=$(python3 -c "import glob,site,os;h=[p for d in site.getsitepackages() for p in glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))];print(os.path.dirname(h[0]) if h else '')")
SHAPE=(--launcher torchrun --dist-backend nccl --mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back)
for sms in 20 32 64; do
  PYTHONPATH=/tmp/upstream LD_LIBRARY_PATH="$NVSHMEM_LIB:${LD_LIBRARY_PATH:-}" timeout -k 5 60 "${RUN[@]}" tools/bench_deepep.py --upstream-dir /tmp/upstream "${SHAPE[@]}" --num-sms $sms --json $R/deepep_sms$sms.json > $R/deepep_sms$sms.txt 2>&1; echo "=== deepep $sms exit $?"
  PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" tools/bench.py --backend cuda "${SHAPE[@]}" --num-sms $sms --json $R/cuda_sms$sms.json > $R/cuda_sms$sms.txt 2>&1; echo "=== cuda $sms exit $?"
done
for f in $R/hb_*.txt; do echo "--- $f"; grep -E "^==|TOTAL|_push|triton launch" $f; done
for f in $R/deepep_*.txt $R/cuda_*.txt; do echo "--- $f"; grep -E "^normal +(dispatch|combine)" $f | cut -c1-110; done
cd $OUT && tar -czf r.tgz r && rm -rf r
