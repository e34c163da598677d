#!/usr/bin/env bash
# Twelfth session, 2xH200, one lease: the per-rank low-latency dispatch (6d57cd3 and later) beside upstream DeepEP
# at T = 32, 128 and 256 tokens per rank (kernel time per op and the captured pair), ours, DeepEP, ours again.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run12c_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
LL=(--mode ll --ll-tokens 32 128 256 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph --ll-kernel-times)
ours() { PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/$1.json > $R/$1.txt 2>&1; echo "=== $1 exit $?"; }
ours cuda
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 120 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "${LL[@]}" --json $R/deepep.json > $R/deepep.txt 2>&1; echo "=== deepep exit $?"
ours cuda_again
python3 - $R <<'PY'
import json, sys
for name in ["cuda", "deepep", "cuda_again"]:
    try:
        d = json.load(open(f"{sys.argv[1]}/{name}.json"))
    except Exception as e:
        print(name, "missing", e); continue
    for r in d["records"]:
        if r["op"].startswith(("kernels", "graph dispatch+combine")):
            print(f'{name:10s} T={r["tokens"]:4d} {r["dtype"][:4]} {r["op"]:24s} {r["time_ms"]*1000:7.1f} us')
PY
cd $OUT && tar -czf run12c_$N.tgz run12c_$N && rm -rf run12c_$N
