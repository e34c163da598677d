#!/usr/bin/env bash
# Correctness on an NVLink host of NPROC GPUs (default: all of them; written for 2 or 4 H200s, # torch 2.11 cu130, python3 3.12), from a copy of this repository:
#   1. the machine; 2. tools/cuda_selftest.py: the cuda backend vs reference over NCCL, bit for bit, plus a
#   timing; 3. the harness: reference over NCCL vs the executable spec vs reference over gloo with CUDA
#   tensors, both modes, every family (H=7168 included); 4. the harness: cuda vs reference over NCCL at
#   NPROC ranks, and at 2 when NPROC > 2. Each step has a deadline; results and logs go to "$OUT".
#   OUT=/tmp/out bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
RUN=(python3 -m torch.distributed.run --standalone)
NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
PLAN=(--families all --large --modes normal,low_latency --dtypes bf16,fp8,fp8_round,fp8_ue8m0,int8 --tokens 32 --max-tokens 64
      --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)

step() {  # step NAME SECONDS COMMAND...: run with a deadline; a failure is reported, not fatal
    local name="$1" limit="$2" start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - start)) s"
}

{
    echo "=== machine"; date -u; nvidia-smi -L; nvidia-smi topo -m
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
    step "cuda self-test x$NPROC" 150 python3 tools/cuda_selftest.py --world "$NPROC"
    step "harness: reference@nccl vs spec vs reference@gloo(cuda tensors) x$NPROC" 200 \
        "${RUN[@]}" --nproc-per-node "$NPROC" tools/crosscheck.py --dist-backend nccl \
        --participants reference@cuda/nccl,spec,reference@cuda/gloo "${PLAN[@]}" --repeats 2 \
        --json "$OUT/crosscheck_reference_x$NPROC.json"
    step "harness: cuda vs reference x$NPROC" 150 \
        "${RUN[@]}" --nproc-per-node "$NPROC" tools/crosscheck.py --dist-backend nccl \
        --participants reference@cuda/nccl,cuda@cuda/nccl "${PLAN[@]}" \
        --json "$OUT/crosscheck_cuda_x$NPROC.json"
    for backend in reference cuda; do
        step "low-latency CUDA graph: capture + replay == eager ($backend) x$NPROC" 120 \
            python3 tools/ll_graph_check.py --world "$NPROC" --backend "$backend"
    done
    if (( NPROC > 2 )); then
        step "harness: cuda vs reference x2" 80 env CUDA_VISIBLE_DEVICES=0,1 \
            "${RUN[@]}" --nproc-per-node 2 tools/crosscheck.py --dist-backend nccl \
            --participants reference@cuda/nccl,cuda@cuda/nccl "${PLAN[@]}" \
            --json "$OUT/crosscheck_cuda_x2.json"
    fi
} 2>&1 | tee "$OUT/gpu_check_log.txt"
