"""tools/bench.py with the cuda backend's low-latency launch constants overridden for one run (a tuning probe):

    LL_VARIANT=PROGRAMS_PER_SM=16,ROW_WARPS=4 torchrun ... variant.py <bench.py arguments>
"""

import os
import runpy
import sys

import deep_ep.backends.cuda_low_latency as low_latency

for item in filter(None, os.environ.get("LL_VARIANT", "").split(",")):
    name, value = item.split("=")
    assert hasattr(low_latency, name), name
    setattr(low_latency, name, int(value))
sys.argv = ["tools/bench.py", *sys.argv[1:]]
runpy.run_path("tools/bench.py", run_name="__main__")
