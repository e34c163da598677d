"""tools/bench.py with the reference backend's token chunks set for one run (an A/B probe; needs
reference_chunks.patch applied, the experiment that was not kept):

    REF_CHUNKS=cuda:2,cpu:1 torchrun ... chunks.py <bench.py arguments>
"""

import os
import runpy
import sys

from deep_ep.backends.reference import ReferenceBackend

chunks = {}
for item in filter(None, os.environ.get("REF_CHUNKS", "").split(",")):
    device, count = item.split(":")
    chunks[device] = int(count)
ReferenceBackend.pipeline_chunks = chunks
sys.argv = ["tools/bench.py", *sys.argv[1:]]
runpy.run_path("tools/bench.py", run_name="__main__")
