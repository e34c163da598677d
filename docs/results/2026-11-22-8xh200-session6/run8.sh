#!/usr/bin/env bash
# Session 6, 8 x H200 (nvidia-h200-x8), with ~2 minutes of device time: the most important first, every
# result written straight into $OUT (a run cut short still returns what it finished).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 8)
PLAN=(--families all --large --modes normal,low_latency --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
BENCH=(--launcher torchrun --dist-backend nccl --mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bf16 --iters 20 --warmup 5 --timing back-to-back --quiet)
{
date -u; nvidia-smi -L | wc -l
echo "=== harness cuda vs reference x8"; timeout -k 5 60 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl "${PLAN[@]}" > "$OUT/cross8_cuda.txt" 2>&1; echo "exit $?"; tail -12 "$OUT/cross8_cuda.txt"
echo "=== bench cuda x8"; timeout -k 5 40 "${RUN[@]}" tools/bench.py "${BENCH[@]}" --backend cuda > "$OUT/bench8_cuda.txt" 2>&1; echo "exit $?"; grep -E "^normal +(dispatch|combine)" "$OUT/bench8_cuda.txt"
python3 -m pip install -q --no-index --no-deps --target /tmp/upstream .whl/tokenspeed_deepep-*.whl
NV=$(python3 -c "import glob,os,site; h=[p for d in site.getsitepackages() for p in glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))]; print(os.path.dirname(h[0]) if h else '')")
echo "=== bench upstream DeepEP x8"; timeout -k 5 40 env PYTHONPATH=/tmp/upstream LD_LIBRARY_PATH="$NV:${LD_LIBRARY_PATH:-}" "${RUN[@]}" tools/bench_deepep.py --upstream-dir /tmp/upstream "${BENCH[@]}" > "$OUT/bench8_deepep.txt" 2>&1; echo "exit $?"; grep -E "^normal +(dispatch|combine)" "$OUT/bench8_deepep.txt"
echo "=== harness reference vs spec x8"; timeout -k 5 60 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --families all --modes normal,low_latency --dtypes bf16,fp8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60 > "$OUT/cross8_spec.txt" 2>&1; echo "exit $?"; tail -12 "$OUT/cross8_spec.txt"
echo "=== bench reference x8"; timeout -k 5 40 "${RUN[@]}" tools/bench.py "${BENCH[@]}" --backend reference > "$OUT/bench8_reference.txt" 2>&1; echo "exit $?"; grep -E "^normal +(dispatch|combine)" "$OUT/bench8_reference.txt"
} 2>&1 | tee "$OUT/log8.txt"
