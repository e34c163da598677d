#!/usr/bin/env bash
# Eleventh session, 4xH200, one lease: the low-latency dispatch push split into PUSH_PARTS programs per message.
# Correctness (self-test, low-latency harness, graph check), then per-op kernel times: this tree (PUSH_PARTS=2),
# variants 1 and 4 (docs/results/2026-11-22-h200-session10/variant.py), upstream DeepEP, this tree again.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
R=$OUT/run11b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck ll"; PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes low_latency "${PLAN[@]}" > $R/cross_ll.txt 2>&1; echo "exit $?"; tail -3 $R/cross_ll.txt
echo "=== graph check"; PYTHONPATH=. timeout -k 5 60 python3 tools/ll_graph_check.py --world $N --backend cuda > $R/graph_check.txt 2>&1; echo "exit $?"; tail -2 $R/graph_check.txt
LL=(--mode ll --ll-tokens 128 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph --ll-kernel-times)
V=docs/results/2026-11-22-h200-session10/variant.py
cuda() { local label=$1; shift; env "$@" PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" $V --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/$label.json > $R/$label.txt 2>&1; echo "=== $label exit $?"; }
cuda cuda LL_VARIANT=
cuda parts1 LL_VARIANT=PUSH_PARTS=1
cuda parts4 LL_VARIANT=PUSH_PARTS=4
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 60 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "${LL[@]}" --json $R/deepep.json > $R/deepep.txt 2>&1; echo "=== deepep exit $?"
cuda cuda_again LL_VARIANT=
python3 - $R <<'PY'
import json, sys
for name in ["cuda", "parts1", "parts4", "deepep", "cuda_again"]:
    try:
        d = json.load(open(f"{sys.argv[1]}/{name}.json"))
    except Exception as e:
        print(name, "missing", e); continue
    print(name, "; ".join(f'{r["op"]} {r["dtype"][:4]} {r["time_ms"]*1000:.1f}' for r in d["records"] if r["op"].startswith(("kernels", "graph"))))
PY
cd $OUT && tar -czf run11b_$N.tgz run11b_$N && rm -rf run11b_$N
