"""Kernels, each next to a torch fallback that gives the same bits: device kernels written in Python (Triton),
and one host kernel in C (`host_ordered_sum`, compiled on first use where a C compiler is).

Importing this package (or any module in it but the `triton_*` ones) never imports Triton: a CPU install
must keep working, and the fallbacks are what the CPU tests check the kernels' contracts against.
CUDA C++ kernels, when there are any, live in `kernels/cuda/` at the repository root (built by setup.py).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util


@functools.cache
def triton_importable(module: str) -> bool:
    """Whether Triton and this package's kernel module `module` (e.g. "triton_row_gather") import; compiles
    nothing (kernels compile at their first launch). A broken Triton install must leave the torch paths working."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module(f"{__name__}.{module}")
    except Exception:
        return False
    return True
