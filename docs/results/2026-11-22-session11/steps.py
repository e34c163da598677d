"""tools/bench.py with the reference backend's `transfer_in_steps` set for one run (an A/B probe; needs
reference_steps.patch applied, the experiment that was not kept):

    REF_STEPS=cuda torchrun ... steps.py <bench.py arguments>     (REF_STEPS= : one all-to-all everywhere)
"""

import os
import runpy
import sys

from deep_ep.backends.reference import ReferenceBackend

ReferenceBackend.transfer_in_steps = frozenset(filter(None, os.environ.get("REF_STEPS", "").split(",")))
sys.argv = ["tools/bench.py", *sys.argv[1:]]
runpy.run_path("tools/bench.py", run_name="__main__")
