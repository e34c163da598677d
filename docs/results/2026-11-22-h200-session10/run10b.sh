#!/usr/bin/env bash
# Tenth session, 4xH200: low-latency per-op figures, T=128 x 7168, top-8 of 256, bf16 and fp8, back to back:
# upstream DeepEP and this commit, each with --ll-graph and --ll-kernel-times (rank 0 profiled; run10a's first
# version profiled every rank at once and hung), and the per-kernel tables (--profile).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
R=$OUT/run10b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
LL=(--mode ll --ll-tokens 128 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph --ll-kernel-times)
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 75 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "${LL[@]}" --json $R/deepep.json --profile $R/deepep_kernels.txt > $R/deepep.txt 2>&1; echo "=== deepep exit $?"
PYTHONPATH=. timeout -k 5 75 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/cuda.json --profile $R/cuda_kernels.txt > $R/cuda.txt 2>&1; echo "=== cuda exit $?"
for f in $R/deepep.txt $R/cuda.txt; do echo "--- $f"; grep -E "^ll " $f | cut -c1-100; done
cd $OUT && tar -czf run10b_$N.tgz run10b_$N && rm -rf run10b_$N
