#!/usr/bin/env bash
# Nineteenth session, 2xH200: back-to-back bench of cuda at 32 SMs (twice) beside upstream DeepEP at 20 / 32 SMs
# in one lease, at 4096 x 7168 bf16, top-8 of 256 (issue 8's 2xH200 target: >= 520 GB/s with <= 32 SMs).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run19b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
git rev-parse HEAD > $R/commit.txt 2>/dev/null; nvidia-smi -L > $R/gpus.txt
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl > $R/pip.txt 2>&1
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
bench() { local label=$1; shift
  PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --json $R/$label.json "$@" > $R/$label.txt 2>&1; echo "=== $label exit $?"; }
upstream() { local label=$1; shift
  env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 90 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "${SHAPE[@]}" "$@" --json $R/$label.json > $R/$label.txt 2>&1; echo "=== $label exit $?"; }
bench cuda_sms32_1 --num-sms 32; upstream upstream_sms20 --num-sms 20; upstream upstream_sms32 --num-sms 32; bench cuda_sms32_2 --num-sms 32
for f in $R/cuda_sms32_1.txt $R/upstream_sms20.txt $R/upstream_sms32.txt $R/cuda_sms32_2.txt; do echo "--- $(basename $f)"; grep -E "^normal +(dispatch|dispatch_cached|combine) " $f | cut -c1-130; done
cd $OUT && tar -czf run19b_$N.tgz run19b_$N && rm -rf run19b_$N
