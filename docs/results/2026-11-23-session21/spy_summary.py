"""Summarise py-spy raw stacks (run21a.sh): per op (the `op_*` frame of host_spy.py), the share of samples by
function (inclusive, each function once per stack) and by leaf line.

    python spy_summary.py spy.txt
"""

from __future__ import annotations

import collections
import re
import sys


def main(path: str) -> None:
    leaves = collections.defaultdict(collections.Counter)
    functions = collections.defaultdict(collections.Counter)
    total = collections.Counter()
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        op = next((f.split(" ")[0] for f in frames if f.startswith("op_")), None)
        if op is None:
            continue
        n = int(count)
        total[op] += n
        leaves[op][frames[-1]] += n
        for name in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            functions[op][name] += n
    for op, samples in total.items():
        print(f"== {op}: {samples} samples")
        for title, counter in (("inclusive by function", functions[op]), ("leaf lines", leaves[op])):
            print(f"  -- {title} (top 40)")
            for name, n in counter.most_common(40):
                print(f"  {100 * n / samples:5.1f}%  {name}")


if __name__ == "__main__":
    main(sys.argv[1])
