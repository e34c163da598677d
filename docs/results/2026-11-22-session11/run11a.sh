#!/usr/bin/env bash
# Eleventh session, 4xH200, one lease: the reference backend's rows in token chunks (list all-to-all per chunk).
# 1. correctness: harness reference over NCCL vs the executable spec (normal mode, every family), and cuda vs
#    reference (normal mode: the cuda backend's dispatch is the reference's with its own transport);
# 2. issue 7's GPU figure: the reference, 4096 tokens, back to back, chunks 1 (the code before) / 2 / 4, twice;
# 3. the cuda low-latency counters advanced by the ops' last kernels: low-latency harness, graph check, per-op
#    kernel times of this tree, of ab_before/ (git archive of 42a5d29, carried untracked), of this tree again.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-4}
D=docs/results/2026-11-22-session11
R=$OUT/run11a_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -3 $R/cross_spec.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
bench() {  # bench CHUNKS LABEL [extra...]
  local chunks=$1 label=$2; shift 2
  REF_CHUNKS=cuda:$chunks PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" $D/chunks.py --launcher torchrun --dist-backend nccl --backend reference "${SHAPE[@]}" --json $R/$label.json "$@" > $R/$label.txt 2>&1; echo "=== $label exit $?"
}
bench 1 c1_a; bench 2 c2_a; bench 4 c4_a; bench 1 c1_b; bench 2 c2_b; bench 4 c4_b
bench 2 c2_prof --iters 10 --warmup 3 --profile $R/profile_c2.txt
echo "=== crosscheck ll"; PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes low_latency "${PLAN[@]}" > $R/cross_ll.txt 2>&1; echo "exit $?"; tail -3 $R/cross_ll.txt
echo "=== graph check"; PYTHONPATH=. timeout -k 5 60 python3 tools/ll_graph_check.py --world $N --backend cuda > $R/graph_check.txt 2>&1; echo "exit $?"; tail -2 $R/graph_check.txt
LL=(--mode ll --ll-tokens 128 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph --ll-kernel-times)
ll() { (cd $1 && PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${LL[@]}" --json $R/$2.json > $R/$2.txt 2>&1); echo "=== $2 exit $?"; }
ll . ll_new; ll ab_before ll_before; ll . ll_new_again
for f in $R/ll_*.txt; do echo "--- $f"; grep -E "^ll +(graph|kernels)" $f | cut -c1-22,58-100; done
for f in $R/c*_?.txt; do echo "--- $f"; grep -E "^normal +(dispatch|dispatch_cached|combine) " $f | cut -c1-110; done
cd $OUT && tar -czf run11a_$N.tgz run11a_$N && rm -rf run11a_$N
