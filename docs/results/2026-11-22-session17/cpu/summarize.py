"""Ratios to the raw all-to-all (and ms) of run.sh's JSON files, before / after, round 1 and 2."""

import glob
import json
import os

here = os.path.dirname(os.path.abspath(__file__))
cells = {}
for path in sorted(glob.glob(os.path.join(here, "n*_r*.json"))):
    ranks, name, round_ = os.path.basename(path)[:-5].split("_")
    for rec in json.load(open(path))["records"]:
        if rec["impl"].startswith("deep_ep") and rec["op"] != "layout":
            key = (ranks[1:], rec["op"], rec["dtype"], rec["tokens"])
            cells.setdefault(key, {})[f"{name} {round_}"] = f"{rec['ratio_to_raw_a2a']:.2f}x ({rec['time_ms']:.1f})"
names = ["before r1", "after r1", "before r2", "after r2"]
print("| ranks | op | dtype | tokens | " + " | ".join(names) + " |")
print("|---|---|---|---:|" + "---|" * len(names))
for key in sorted(cells, key=lambda k: (k[0], k[1], k[2], k[3])):
    print("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells[key].get(n, "-") for n in names) + " |")
