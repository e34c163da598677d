#!/usr/bin/env bash
# Ninth session, 2xH200, the code at the commit that added this script (the eighth session's: the pulling
# cached dispatch, never run on 2 GPUs before), from a copy of the repository (.whl/ carried):
# 1. correctness at 2 ranks: cuda self-test; the harness cuda vs reference (both modes);
# 2. upstream DeepEP and the cuda backend for each SM budget, back to back (DeepEP's tests' timing), one lease.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
N=${NPROC:-2}
R=$OUT/run9a; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node $N)
PLAN=(--families all --large --dtypes bf16,fp8,int8 --tokens 32 --max-tokens 64 --topk 8 --experts-per-rank 8 --rules exact --comm-timeout 60)
nvidia-smi topo -m > $R/topo.txt 2>&1
echo "=== selftest"; PYTHONPATH=. timeout -k 5 150 python3 tools/cuda_selftest.py --world $N --no-timing > $R/selftest.txt 2>&1; echo "exit $?"; tail -2 $R/selftest.txt
echo "=== crosscheck cuda"; PYTHONPATH=. timeout -k 5 120 "${RUN[@]}" tools/crosscheck.py --dist-backend nccl --participants reference@cuda/nccl,cuda@cuda/nccl --modes normal,low_latency "${PLAN[@]}" > $R/cross_cuda.txt 2>&1; echo "exit $?"; tail -3 $R/cross_cuda.txt
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 --iters 30 --warmup 10 --timing back-to-back)
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
for sms in 20 32 64; do
  env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 60 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "${SHAPE[@]}" --num-sms $sms --json $R/deepep_sms$sms.json > $R/deepep_sms$sms.txt 2>&1; echo "=== deepep sms=$sms exit $?"
  PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --num-sms $sms --json $R/cuda_sms$sms.json > $R/cuda_sms$sms.txt 2>&1; echo "=== cuda sms=$sms exit $?"
done
PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --num-sms 20 --profile $R/profile_sms20.txt --json $R/cuda_prof.json > $R/cuda_prof.txt 2>&1; echo "=== profile exit $?"
for f in $R/deepep_*.txt $R/cuda_*.txt; do echo "--- $f"; grep -E "^normal +(dispatch|combine)" $f | cut -c1-120; done
cd $OUT && tar -czf run9a.tgz run9a && rm -rf run9a
