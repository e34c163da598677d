"""Kernels, each next to a torch fallback that gives the same bits: device kernels written in Python (Triton),
and one host kernel in C (`host_ordered_sum`, compiled on first use where a C compiler is).

Importing this package (or any module in it but the `triton_*` ones) never imports Triton: a CPU install
must keep working, and the fallbacks are what the CPU tests check the kernels' contracts against.
CUDA C++ kernels, when there are any, live in `kernels/cuda/` at the repository root (built by setup.py).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from typing import Any

import torch


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


def on_device(device: torch.device) -> Any:
    """A context in which `device` is the current CUDA device, where Triton and torch launch: a guard only when
    it is not current already (entering one costs microseconds of host time, on every launch of a hot path)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
