#!/usr/bin/env bash
# Twenty-third session, 2xH200, at the session's last library code (the fresh dispatch's kernels and host trims,
# the review fixes of the bench tools, autograd, low-latency API and the error-path fuzzer):
# 1. the twenty-second session's re-verification (self-test; harness cuda vs reference and reference vs spec,
#    both modes, every family and LL format; in_step for reference and cuda; LL CUDA-graph check; gpu-marked
#    permute tests; one back-to-back bench at 32 SMs);
# 2. the fresh-dispatch A/B against 6b273e0 (run23a.sh PART=perf; needs ab_main/).
set -u
bash docs/results/2026-11-23-session22/run22b.sh
PART=perf bash docs/results/2026-11-23-session23/run23a.sh
cd $OUT && tar -czf run23c.tgz run22b_* run23a_* && rm -rf run22b_* run23a_*
