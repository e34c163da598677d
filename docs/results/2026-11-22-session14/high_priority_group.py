"""Run a script (tools/bench.py, own_rows_bench.py, ...) with its NCCL process group created with
`ProcessGroupNCCL.Options(is_high_priority_stream=True)`: NCCL's kernels then run on a high-priority stream, so
the GPU starts them ahead of kernels queued beside them on ordinary streams (the reference's own-row gather), with
no host work per call. A user's choice when creating the group; this wrapper makes it for an unchanged script.

    torchrun ... docs/results/2026-11-22-session14/high_priority_group.py tools/bench.py <bench arguments>
"""

from __future__ import annotations

import runpy
import sys

import torch.distributed as dist

_init = dist.init_process_group


def _init_high_priority(backend: str | None = None, *args, **kwargs):
    if backend == "nccl" and "pg_options" not in kwargs:
        kwargs["pg_options"] = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    return _init(backend, *args, **kwargs)


dist.init_process_group = _init_high_priority
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
