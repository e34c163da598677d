#!/usr/bin/env bash
# Twenty-sixth session, 2xH200, the session's last library code (after run26a: hook marks, host-board messages,
# explicitly_destroy agreed at creation, timed-out groups remembered): self-test, harness cuda vs reference and
# reference vs the executable spec, in_step for cuda, the low-latency graph check, bench.py back to back once.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run26b_$N; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,fp8_round,fp8_ue8m0,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
git status --short > $R/tree.txt; md5sum deep_ep/*.py deep_ep/backends/*.py >> $R/tree.txt; nvidia-smi -L > $R/gpus.txt
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 200 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -2 $R/cross_cuda.txt
echo "=== crosscheck spec"; PYTHONPATH=. timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,spec --modes normal,low_latency "${PLAN[@]}" > $R/cross_spec.txt 2>&1; echo "exit $?"; tail -2 $R/cross_spec.txt
echo "=== in_step cuda"; timeout -k 5 120 python3 docs/results/2026-11-22-session19/in_step_nccl.py --world $N --backend cuda > $R/in_step_cuda.txt 2>&1; echo "exit $?"; tail -1 $R/in_step_cuda.txt | cut -c1-160
echo "=== ll graph cuda"; PYTHONPATH=. timeout -k 5 100 python3 tools/ll_graph_check.py --world $N --backend cuda > $R/ll_graph.txt 2>&1; echo "exit $?"; tail -1 $R/ll_graph.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back --num-sms 32)
PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --json $R/bench_1.json > $R/bench_1.txt 2>&1; echo "bench exit $?"
grep -E "^normal +(dispatch|dispatch_cached|combine) " $R/bench_1.txt | cut -c1-130
cd $OUT && tar -czf run26b_$N.tgz run26b_$N && rm -rf run26b_$N
