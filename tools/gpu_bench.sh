#!/usr/bin/env bash
# Issue 7's GPU run, for a host with 4 NVLink-connected GPUs (written for 4xH200, torch 2.11 cu130,
# python3 3.12, no internet), from a copy of this repository as the working directory:
#   1. deep_ep's reference backend over NCCL, 4 ranks (tools/bench.py under torchrun): normal mode at
#      4096 tokens x 7168 hidden, top-8 of 256 experts, with a tokens sweep; low-latency mode T = 32..256;
#      bf16 and fp8; the raw all_to_all_single of the same bytes in the same processes; a torch.profiler
#      summary (top ops by CUDA time) of one fresh dispatch, one cached dispatch and one combine at 4096
#      tokens, and of one low-latency dispatch and combine at T=256;
#   2. upstream DeepEP, the same workloads (tools/bench_deepep.py), from the tokenspeed-deepep wheel in .whl/
#      installed into its own directory (it also installs a module named deep_ep); normal and low-latency mode
#      in separate processes (low-latency mode initialises NVSHMEM);
#   3. deep_ep's cuda backend, both modes, if it is usable on the host (it says why not otherwise);
#   4. at the largest token count, upstream DeepEP and the cuda backend for each SM budget in SMS_SWEEP
#      (default "20 32 64"; Buffer.set_num_sms);
#   5. one merged report.
# Writes into "$OUT": bench_gpu.json (every figure, with its byte accounting and the machine), bench_gpu.png,
# profile_reference.txt and bench_gpu_log.txt (the tables and everything printed). About 3-4 minutes; each
# step has a deadline (about 8 minutes in all at worst). .whl/ is git-ignored: carry it along with the copy.
#
#   OUT=/tmp/bench_out bash tools/gpu_bench.sh
#   TIMING=back-to-back OUT=/tmp/bench_out bash tools/gpu_bench.sh   # every bench timed as DeepEP's tests time
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
NPROC="${NPROC:-4}"
UPSTREAM="${UPSTREAM:-/tmp/upstream}"
WORK="$(mktemp -d)"
DIST="${DIST_BACKEND:-nccl}"
SHAPE=(--hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10)
NORMAL=(--tokens 512 1024 2048 4096)
LL=(--ll-tokens 32 64 128 256)
SHAPE+=(--timing "${TIMING:-idle}")  # TIMING=back-to-back: as DeepEP's tests time (tools/bench.py --help)
if [[ "${SMOKE:-0}" == 1 ]]; then  # a dry run of this script's plumbing (e.g. DIST_BACKEND=gloo on a CPU)
    SHAPE=(--hidden 256 --topk 4 --experts 16 --dtype bfloat16 fp8 --iters 3 --warmup 1 --timing "${TIMING:-idle}")
    NORMAL=(--tokens 32 64)
    LL=(--ll-tokens 8 16)
fi
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC")

step() {  # step NAME SECONDS COMMAND...: run with a deadline; a failure is reported, not fatal
    local name="$1" limit="$2" start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    return "$rc"
}

main() {
    echo "=== machine"
    date -u
    nvidia-smi -L || true
    nvidia-smi topo -m || true
    python3 - <<'PY'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("nccl", torch.cuda.nccl.version(), "gpus", torch.cuda.device_count(), "x", torch.cuda.get_device_name())
PY
    python3 -m pip list 2>/dev/null | grep -i -E "^(torch|nvidia-(nccl|nvshmem)|matplotlib) " || true

    step "deep_ep reference backend, normal + low-latency, $DIST x$NPROC" 150 \
        "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend "$DIST" --backend reference --mode all \
        "${NORMAL[@]}" "${LL[@]}" "${SHAPE[@]}" --ll-graph --ll-kernel-times --json "$WORK/1_reference.json" \
        --profile "$OUT/profile_reference.txt"

    step "install upstream DeepEP into $UPSTREAM" 60 \
        python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl
    # The extension's RUNPATH names the build machine; its libnvshmem_host.so.3 comes from the nvidia-nvshmem
    # wheel beside torch (tools/bench_deepep.py also preloads it).
    local nvshmem
    nvshmem="$(python3 - <<'PY'
import glob, os, site, sys
for d in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    hits = glob.glob(os.path.join(d, "nvidia", "nvshmem", "lib", "libnvshmem_host.so*"))
    if hits:
        print(os.path.dirname(hits[0]))
        break
PY
)"
    echo "nvshmem library directory: ${nvshmem:-not found}"
    local upstream_env=(env PYTHONPATH="$UPSTREAM" LD_LIBRARY_PATH="${nvshmem:+$nvshmem:}${LD_LIBRARY_PATH:-}")
    local upstream=("${upstream_env[@]}" "${RUN[@]}" tools/bench_deepep.py --upstream-dir "$UPSTREAM"
        --launcher torchrun --dist-backend "$DIST")

    step "upstream DeepEP, normal mode" 90 \
        "${upstream[@]}" --mode normal "${NORMAL[@]}" "${SHAPE[@]}" --json "$WORK/2_upstream_normal.json"

    local start=$SECONDS
    if ! step "upstream DeepEP, low-latency mode" 80 \
        "${upstream[@]}" --mode ll "${LL[@]}" "${SHAPE[@]}" --ll-graph --ll-kernel-times --json "$WORK/3_upstream_ll.json" \
        && (( SECONDS - start < 50 )); then
        # A quick failure is most likely NVSHMEM finding no RDMA transport: all peers are NVLink peers here.
        step "upstream DeepEP, low-latency mode, NVSHMEM_REMOTE_TRANSPORT=none" 50 \
            env NVSHMEM_REMOTE_TRANSPORT=none "${upstream[@]}" --mode ll "${LL[@]}" "${SHAPE[@]}" --ll-graph --ll-kernel-times \
            --json "$WORK/3_upstream_ll.json"
    fi

    # deep_ep's cuda backend (peer writes over NVLink, Triton kernels), if it is usable here: an explicit
    # backend name never falls back, so an unusable one says why. Low-latency mode twice: with the façade's
    # per-call checks (the default) and without them (DeepEP has none), labelled "(unchecked)".
    step "deep_ep cuda backend, normal + low-latency, $DIST x$NPROC" 120 \
        "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend "$DIST" --backend cuda --mode all \
        "${NORMAL[@]}" "${LL[@]}" "${SHAPE[@]}" --ll-graph --ll-kernel-times --json "$WORK/4_cuda.json" --profile "$OUT/profile_cuda.txt"
    step "deep_ep cuda backend, low-latency without per-call checks, $DIST x$NPROC" 60 \
        "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend "$DIST" --backend cuda --mode ll \
        "${LL[@]}" "${SHAPE[@]}" --no-agreement-check --no-value-checks --json "$WORK/5_cuda_unchecked.json"

    # DeepEP's metric at the issue's shape for several SM budgets (Buffer.set_num_sms), upstream and cuda side
    # by side; deep_ep with its per-call checks (the default: on one host they cost no device round trip).
    local sms
    for sms in ${SMS_SWEEP:-20 32 64}; do
        step "upstream DeepEP, normal mode, num_sms=$sms" 60 \
            "${upstream[@]}" --mode normal --tokens "${NORMAL[-1]}" "${SHAPE[@]}" --num-sms "$sms" \
            --json "$WORK/6_upstream_sms$sms.json"
        step "deep_ep cuda backend, normal mode, num_sms=$sms" 60 \
            "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend "$DIST" --backend cuda --mode normal \
            --tokens "${NORMAL[-1]}" "${SHAPE[@]}" --num-sms "$sms" \
            --json "$WORK/7_cuda_sms$sms.json"
    done

    echo "=== merged report"
    local reports=("$WORK"/*.json)
    if [[ -e "${reports[0]}" ]]; then
        python3 tools/bench.py --merge "${reports[@]}" --json "$OUT/bench_gpu.json" --plot "$OUT/bench_gpu.png"
    else
        echo "no report was written"
    fi
    echo "=== done: $(ls "$OUT")"
}

main 2>&1 | tee "$OUT/bench_gpu_log.txt"
exit "${PIPESTATUS[0]}"
