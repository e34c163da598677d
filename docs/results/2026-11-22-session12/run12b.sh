#!/usr/bin/env bash
# Twelfth session, 4xH200, one lease: the low-latency dispatch that sends each token once per destination rank
# (6d57cd3), against the code before it (ab_before/: git archive of 6821137, carried untracked) and upstream
# DeepEP; and where the reference backend's host time goes when its calls run back to back.
# 1. correctness: low-latency harness cuda vs reference, graph replay check;
# 2. per-op kernel times: this tree, ab_before, DeepEP, this tree again, ab_before again;
# 3. the reference: burst.py (host and device time per call, agreement check off/on, a profiled burst),
#    host_breakdown.py (BACKEND=reference, check on), bench.py 4096 tokens back to back, check on and off;
# 4. the cuda self-test.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
D=docs/results/2026-11-22-session12
R=$OUT/run12b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
echo "cpus: $(nproc)"
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== crosscheck ll"; PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes low_latency "${PLAN[@]}" > $R/cross_ll.txt 2>&1; echo "exit $?"; tail -n 3 $R/cross_ll.txt
echo "=== graph check"; PYTHONPATH=. timeout -k 5 60 python3 tools/ll_graph_check.py --world $N --backend cuda > $R/graph_check.txt 2>&1; echo "exit $?"; tail -n 2 $R/graph_check.txt
LL=(--mode ll --ll-tokens 128 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph --ll-kernel-times)
ll() { (cd $1 && PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/$2.json > $R/$2.txt 2>&1); echo "=== $2 exit $?"; }
ll . ll_new; ll ab_before ll_before
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 60 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "${LL[@]}" --json $R/deepep.json > $R/deepep.txt 2>&1; echo "=== deepep exit $?"
ll . ll_new_again; ll ab_before ll_before_again
for f in $R/ll_*.txt $R/deepep.txt; do echo "--- $f"; grep -E "^ll +(graph|kernels)" $f | cut -c1-22,58-100; done
echo "=== burst"; PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" $D/burst.py > $R/burst.txt 2>&1; echo "exit $?"; grep -E "^==|unprofiled|bursts of 10|allocator" $R/burst.txt
echo "=== host breakdown"; BACKEND=reference CHECK=1 PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/host_breakdown.py > $R/host_breakdown.txt 2>&1; echo "exit $?"; grep -E "^==|TOTAL" $R/host_breakdown.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
ref() { PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/$1.json "${@:2}" > $R/$1.txt 2>&1; echo "=== $1 exit $?"; grep -E "^normal +(dispatch_cached|combine) " $R/$1.txt | cut -c1-110; }
ref ref_a; ref ref_nocheck_a --no-agreement-check; ref ref_b; ref ref_nocheck_b --no-agreement-check
[ -n "${SKIP_SELFTEST:-}" ] || { echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -n 2 $R/selftest.txt; }
cd $OUT && tar -czf run12b_$N.tgz run12b_$N && rm -rf run12b_$N
