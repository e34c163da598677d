#!/usr/bin/env bash
# Seventeenth session, CPU: tools/bench.py on main before the host C ordered sum ($BEFORE: `git archive 2d3d1db
# deep_ep tools` unpacked) and after it ($AFTER: d6c2a50's deep_ep and tools), alternating, two rounds, 4 and
# 2 ranks. Each runs from inside its tree: the forkserver that starts the ranks imports deep_ep from the current
# directory first (before this session's launcher check, silently).
set -euo pipefail
out=$(cd "$(dirname "$0")" && pwd)
for round in 1 2; do
  for ranks in 4 2; do
    for name in before after; do
      tree=$([ $name = before ] && echo "$BEFORE" || echo "$AFTER")
      log=$out/n${ranks}_${name}_r$round
      (cd "$tree" && OMP_NUM_THREADS=1 python tools/bench.py --ranks $ranks --mode normal --tokens 128 512 \
        --hidden 7168 --topk 8 --experts 256 --dtype bf16 fp8 --iters 20 --warmup 3 --quiet \
        --json $log.json --markdown $log.md > $log.txt 2>&1)
      uptime >> $log.txt
    done
  done
done
