#!/usr/bin/env bash
# Eighth session, 4xH200: the pulling cached dispatch against the pushing one (74e8706, a git archive carried as
# ab_before/, untracked) and upstream DeepEP (tokenspeed-deepep 1.2.1 from .whl/, its own install directory), all
# in one lease, normal mode at 4096 x 7168, top-8 of 256, bf16 and fp8, back to back (DeepEP's timing), for
# each SM budget; then a second before/after round at 20 and 32 SMs.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R=$OUT/bench; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
SHAPE=(--mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back)
UPSTREAM=/tmp/upstream
python3 -m pip install -q --no-index --no-deps --target "$UPSTREAM" .whl/tokenspeed_deepep-*.whl
NVSHMEM=$(python3 -c "import glob,os,site,sys
for d in site.getsitepackages()+sys.path:
    h=glob.glob(os.path.join(d,'nvidia','nvshmem','lib','libnvshmem_host.so*'))
    if h: print(os.path.dirname(h[0])); break")
ours() {  # ours TREE LABEL SMS
  (cd $1 && PYTHONPATH=. timeout -k 5 60 "${RUN[@]}" tools/bench.py --launcher torchrun --dist-backend nccl --backend cuda "${SHAPE[@]}" --num-sms $3 --json $R/$2_sms$3.json > $R/$2_sms$3.txt 2>&1); echo "=== $2 sms=$3 exit $?"
}
for sms in 20 32 64; do
  env PYTHONPATH=$UPSTREAM LD_LIBRARY_PATH=$NVSHMEM:${LD_LIBRARY_PATH:-} timeout -k 5 60 "${RUN[@]}" tools/bench_deepep.py --upstream-dir $UPSTREAM --launcher torchrun --dist-backend nccl "${SHAPE[@]}" --num-sms $sms --json $R/deepep_sms$sms.json > $R/deepep_sms$sms.txt 2>&1; echo "=== deepep sms=$sms exit $?"
  ours ab_before before $sms
  ours . after $sms
done
for sms in 20 32; do ours . after2 $sms; ours ab_before before2 $sms; done
for f in $R/*.txt; do echo "--- $f"; grep -E "^normal +(dispatch|combine)" $f | cut -c1-120; done
cd $OUT && tar -czf bench.tgz bench && rm -rf bench
