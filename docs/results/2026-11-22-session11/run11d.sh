#!/usr/bin/env bash
# Eleventh session, 4xH200, one lease: launch shapes of the dispatch's receive copy and the combine's reduce
# (new constants RECEIVE_WARPS, RECEIVE_PROGRAMS_PER_SM, REDUCE_BLOCK; the defaults are the previous shapes),
# swept with docs/results/2026-11-22-h200-session10/variant.py; per-op kernel times, base first and last.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
R=$OUT/run11d_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
LL=(--mode ll --ll-tokens 128 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph --ll-kernel-times)
V=docs/results/2026-11-22-h200-session10/variant.py
cuda() { local label=$1; shift; env "$@" PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" $V --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/$label.json > $R/$label.txt 2>&1; echo "=== $label exit $?"; }
cuda base LL_VARIANT=
cuda recv_warps2 LL_VARIANT=RECEIVE_WARPS=2
cuda recv_warps4 LL_VARIANT=RECEIVE_WARPS=4
cuda recv_pps8 LL_VARIANT=RECEIVE_PROGRAMS_PER_SM=8
cuda recv_pps32 LL_VARIANT=RECEIVE_PROGRAMS_PER_SM=32
cuda reduce512 LL_VARIANT=REDUCE_BLOCK=512
cuda reduce256 LL_VARIANT=REDUCE_BLOCK=256
cuda base_again LL_VARIANT=
python3 - $R <<'PY'
import json, sys
for name in ["base", "recv_warps2", "recv_warps4", "recv_pps8", "recv_pps32", "reduce512", "reduce256", "base_again"]:
    try:
        d = json.load(open(f"{sys.argv[1]}/{name}.json"))
    except Exception as e:
        print(name, "missing", e); continue
    print(name.ljust(12), "; ".join(f'{r["op"][8:]} {r["dtype"][:4]} {r["time_ms"]*1000:.1f}' for r in d["records"] if r["op"].startswith("kernels")))
PY
cd $OUT && tar -czf run11d_$N.tgz run11d_$N && rm -rf run11d_$N
