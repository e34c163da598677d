#!/usr/bin/env bash
# Session 6, device run B (4xH200): the receivers' copy with prefetch, sync-free phase counts; SM splits.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R="$OUT/r"; mkdir -p "$R"
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
BENCH=(tools/bench.py --launcher torchrun --dist-backend nccl --mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bf16 --iters 30 --warmup 10 --quiet --backend cuda)
b() { # b NAME ENV ARGS...
  local name=$1 envs=$2; shift 2
  echo "=== $name ($envs $*)"
  (env $envs timeout -k 5 90 "${RUN[@]}" "${BENCH[@]}" "$@" --json "$R/$name.json" > "$R/$name.txt" 2>&1); echo "exit $?"
  grep "^normal" "$R/$name.txt" | grep -v layout
}
{
date -u
echo "=== selftest quick"; timeout -k 5 150 python3 tools/cuda_selftest.py --world 4 --quick > "$R/selftest.txt" 2>&1; echo "exit $?"; tail -2 "$R/selftest.txt"
echo "=== crosscheck"; timeout -k 5 150 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --families all --large --modes normal --dtypes bf16,fp8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60 > "$R/crosscheck.txt" 2>&1; echo "exit $?"; tail -2 "$R/crosscheck.txt"
b b2b_sms20_copy5 DEEP_EP_CUDA_COPY_SMS=5 --timing back-to-back
b b2b_sms20_copy8 DEEP_EP_CUDA_COPY_SMS=8 --timing back-to-back
b b2b_sms20_copy3 DEEP_EP_CUDA_COPY_SMS=3 --timing back-to-back
b b2b_sms32_copy8 DEEP_EP_CUDA_COPY_SMS=8 --timing back-to-back --num-sms 32
b b2b_sms32_copy12 DEEP_EP_CUDA_COPY_SMS=12 --timing back-to-back --num-sms 32
b idle_sms20_copy5 DEEP_EP_CUDA_COPY_SMS=5 --timing idle --profile "$R/profile_sms20.txt" --profile-calls 3
(cd ab_before && b before_b2b_sms32 X=1 --timing back-to-back --num-sms 32)
} 2>&1 | tee "$R/log.txt"
tar -czf "$OUT/run6b.tgz" -C "$OUT" r && rm -rf "$R"
