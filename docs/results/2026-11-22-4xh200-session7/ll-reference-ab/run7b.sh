set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
RUN=(python3 -m torch.distributed.run --standalone --nproc-per-node 4)
LL=(tools/bench.py --launcher torchrun --dist-backend nccl --backend reference --mode ll --ll-tokens 128 256 --hidden 7168 --topk 8 --experts 256 --dtype bfloat16 fp8 --iters 30 --warmup 10 --timing back-to-back --ll-graph)
for i in 1 2; do
  (cd ab_before && PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" "${LL[@]}" --json $R/ll_before_$i.json > $R/ll_before_$i.txt 2>&1); echo "=== ll before $i exit $?"
  PYTHONPATH=. timeout -k 5 90 "${RUN[@]}" "${LL[@]}" --json $R/ll_after_$i.json > $R/ll_after_$i.txt 2>&1; echo "=== ll after $i exit $?"
done
for f in $R/ll_*.txt; do echo "--- $f"; grep -E "^(ll|normal) " $f | cut -c1-130; done
cd $OUT && tar -czf r.tgz r && rm -rf r
