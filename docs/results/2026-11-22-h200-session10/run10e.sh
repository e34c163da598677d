#!/usr/bin/env bash
# Tenth session, 4xH200, one lease: the session's final code (ROW_WARPS = 2, PROGRAMS_PER_SM = 16).
# 1. correctness: cuda self-test; harness cuda vs reference (both modes, every family); graph replay check;
# 2. T=128 x 7168, top-8 of 256, bf16 and fp8, back to back, per-op figures (--ll-graph, --ll-kernel-times):
#    upstream DeepEP and this commit (twice), and three more launch-constant variants for the record.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
D=docs/results/2026-11-22-h200-session10
R=$OUT/run10e_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
echo "=== graph check"; PYTHONPATH=. timeout -k 5 120 python3 tools/ll_graph_check.py --world $N --backend cuda > $R/graph_check.txt 2>&1; echo "exit $?"; tail -2 $R/graph_check.txt
LL=(--mode ll --ll-tokens 128 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph --ll-kernel-times)
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 75 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "${LL[@]}" --json $R/deepep.json --profile $R/deepep_kernels.txt > $R/deepep.txt 2>&1; echo "=== deepep exit $?"
PYTHONPATH=. timeout -k 5 75 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/cuda.json --profile $R/cuda_kernels.txt > $R/cuda.txt 2>&1; echo "=== cuda exit $?"
variant() {  # variant LABEL CONSTANTS [extra...]
  local label=$1 constants=$2; shift 2
  LL_VARIANT=$constants PYTHONPATH=. timeout -k 5 75 "${RUN[@]}" $D/variant.py --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/$label.json "$@" > $R/$label.txt 2>&1; echo "=== $label exit $?"
}
variant warps2_pps32 PROGRAMS_PER_SM=32
variant warps4_pps32 ROW_WARPS=4,PROGRAMS_PER_SM=32
variant warps1_pps16 ROW_WARPS=1
PYTHONPATH=. timeout -k 5 75 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/cuda_again.json > $R/cuda_again.txt 2>&1; echo "=== cuda again exit $?"
for f in $R/deepep.txt $R/cuda.txt $R/warps*.txt $R/cuda_again.txt; do echo "--- $f"; grep -E "^ll +(graph|kernels)" $f | cut -c1-22,58-100; done
cd $OUT && tar -czf run10e_$N.tgz run10e_$N && rm -rf run10e_$N
