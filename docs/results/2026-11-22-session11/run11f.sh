#!/usr/bin/env bash
# Eleventh session, 4xH200 (NPROC=4) or 2xH200 (NPROC=2 SELFTEST=0), one lease: the low-latency device barrier inside the receive / reduce kernels
# (`_arrive_and_wait`: signal words in the workspace instead of torch symmetric memory's barrier kernel).
# 1. dead-peer check on 2 GPUs (the kernel must trap after the timeout, not hang);
# 2. correctness: self-test, low-latency harness cuda vs reference, graph check;
# 3. per-op kernel times: this tree, ab_before/ (git archive of 85a1405, carried untracked), this tree again.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
D=docs/results/2026-11-22-session11
R=$OUT/run11f_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== dead peer"; DEEP_EP_COMM_TIMEOUT=5 PYTHONPATH=. timeout -k 5 60 python3 -m torch.distributed.run --standalone --nproc-per-node 2 $D/dead_peer_check.py > $R/dead_peer.txt 2>&1; echo "exit $?"; grep -E "rank 0|rank 1" $R/dead_peer.txt | head -4
echo "=== crosscheck ll"; PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes low_latency "${PLAN[@]}" > $R/cross_ll.txt 2>&1; echo "exit $?"; tail -3 $R/cross_ll.txt
echo "=== graph check"; PYTHONPATH=. timeout -k 5 60 python3 tools/ll_graph_check.py --world $N --backend cuda > $R/graph_check.txt 2>&1; echo "exit $?"; tail -2 $R/graph_check.txt
LL=(--mode ll --ll-tokens 128 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph --ll-kernel-times)
ll() { (cd $1 && PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/$2.json > $R/$2.txt 2>&1); echo "=== $2 exit $?"; }
ll . ll_new; ll ab_before ll_before; ll . ll_new_again
if [ "${SELFTEST:-1}" = 1 ]; then
  echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
fi
python3 - $R <<'PY'
import json, sys
for name in ["ll_new", "ll_before", "ll_new_again"]:
    try:
        d = json.load(open(f"{sys.argv[1]}/{name}.json"))
    except Exception as e:
        print(name, "missing", e); continue
    print(name.ljust(13), "; ".join(f'{r["op"]} {r["dtype"][:4]} {r["time_ms"]*1000:.1f}' for r in d["records"] if r["op"].startswith(("kernels", "graph"))))
PY
cd $OUT && tar -czf run11f_$N.tgz run11f_$N && rm -rf run11f_$N
