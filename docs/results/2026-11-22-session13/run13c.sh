#!/usr/bin/env bash
# Thirteenth session, 4xH200: the cuda backend's low-latency mode at T = 128 since the per-rank dispatch
# (6d57cd3), against the code before it (ab_ll/: git archive of 6821137, carried untracked) and upstream DeepEP:
# correctness (harness cuda vs reference, low-latency; graph replay check), then kernel time per op: this
# tree, DeepEP, ab_ll, this tree again.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
R=$OUT/run13c_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== crosscheck ll"; PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes low_latency "${PLAN[@]}" > $R/cross_ll.txt 2>&1; echo "exit $?"; tail -n 3 $R/cross_ll.txt
echo "=== graph check"; PYTHONPATH=. timeout -k 5 60 python3 tools/ll_graph_check.py --world $N --backend cuda > $R/graph_check.txt 2>&1; echo "exit $?"; tail -n 2 $R/graph_check.txt
LL=(--mode ll --ll-tokens 128 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph --ll-kernel-times)
ll() { (cd $1 && PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/$2.json > $R/$2.txt 2>&1); echo "=== $2 exit $?"; }
ll . ll_new
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 60 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "${LL[@]}" --json $R/deepep.json > $R/deepep.txt 2>&1; echo "=== deepep exit $?"
ll ab_ll ll_before; ll . ll_new_again
for f in $R/ll_*.txt $R/deepep.txt; do echo "--- $f"; grep -E "^ll +(graph|kernels)" $f | cut -c1-22,58-100; done
cd $OUT && tar -czf run13c_$N.tgz run13c_$N && rm -rf run13c_$N
