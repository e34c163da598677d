"""`ordered_sum.ordered_gather_sum` for bf16 host tensors, in C (`host_ordered_sum.c`): same contract, same bits.

The host combine of 4 ranks spent most of its time beyond the all-to-all in this sum: gathered, widened and added
term by term with torch ops it took 6-9 ms per 512 tokens x 7168 on one core; one pass that reads each row once
and keeps the float32 sums in registers takes 2-3 ms.

The C file is compiled on first use with the system C compiler (`$CC`, else `cc`/`gcc`; about 0.3 s) into
`$DEEP_EP_CACHE_DIR` (default `${XDG_CACHE_HOME:-~/.cache}/deep_ep`, else a temp directory), named by a hash
of the source and flags, and loaded with ctypes (which releases the GIL during the call). Where there is no
compiler, the build fails, or `DEEP_EP_HOST_KERNEL=0` is set, `usable` is False and callers take the torch
implementation;
`status()` says which and why. Every index is range-checked here before the C code reads memory.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["ordered_gather_sum", "status", "usable"]

log = logging.getLogger("deep_ep.kernels")
_SOURCE = Path(__file__).with_name("host_ordered_sum.c")
_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC"]
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def _cache_dir() -> Path:
    """$DEEP_EP_CACHE_DIR, else $XDG_CACHE_HOME/deep_ep (~/.cache/deep_ep) where it can be created (a read-only
    home: a temp directory)."""
    configured = os.environ.get("DEEP_EP_CACHE_DIR")
    if configured:
        return Path(configured)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deep_ep"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return Path(tempfile.gettempdir()) / f"deep_ep-{os.getuid()}"


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library, or why there is none (a compiler that fails is worth a warning: the sum is slower)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler ($CC, cc or gcc) on PATH"
    library = _build_and_load(compiler)
    if isinstance(library, str):
        log.warning("deep_ep: the host C ordered sum is unavailable, torch ops sum instead: %s", library)
    return library


def _build_and_load(compiler: str) -> ctypes.CDLL | str:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([*_FLAGS, platform.machine()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"host_ordered_sum-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # ranks may build at the same time
            built = subprocess.run(
                [compiler, *_FLAGS, str(_SOURCE), "-o", str(partial)], capture_output=True, text=True, timeout=120
            )
            if built.returncode != 0:
                return f"{compiler} failed: {built.stderr.strip()[:500]}"
            os.replace(partial, target)
        except (OSError, subprocess.SubprocessError) as error:
            return f"building {target} failed: {error}"
    try:
        library = ctypes.CDLL(str(target))
    except OSError as error:
        return f"loading {target} failed: {error}"
    library.deep_ep_ordered_sum_bf16.argtypes = [_PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64]
    library.deep_ep_ordered_sum_bf16.argtypes += [_I64, _I64, _I64, _PTR, _I64]
    library.deep_ep_ordered_sum_bf16.restype = None
    return library


def _disabled() -> bool:
    return os.environ.get("DEEP_EP_HOST_KERNEL", "1") == "0"


def usable(rows: torch.Tensor) -> bool:
    """Whether `ordered_gather_sum` runs the C kernel for these rows (bf16 on the host, library built)."""
    return (
        rows.device.type == "cpu"
        and rows.dtype == torch.bfloat16
        and not _disabled()
        and not isinstance(_library(), str)
    )


def status() -> str:
    """Which implementation bf16 host tensors get: "c (library path)", or "torch (why)"."""
    if _disabled():
        return "torch (DEEP_EP_HOST_KERNEL=0)"
    library = _library()
    return f"torch ({library})" if isinstance(library, str) else f"c ({library._name})"


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 or t.shape[0] == 0 else t.contiguous()


def ordered_gather_sum(
    rows: torch.Tensor,
    row_index: torch.Tensor,
    biases: tuple[torch.Tensor, ...] = (),
    out: torch.Tensor | None = None,
    own: tuple[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Arguments and result as `ordered_sum.ordered_gather_sum`, which has checked shapes and dtypes; this checks
    the row indices against the rows they point into (the C code trusts them)."""
    library = _library()
    assert not isinstance(library, str) and rows.dtype == torch.bfloat16, "call only where usable(rows)"
    num_tokens, num_sources = row_index.shape
    hidden = rows.shape[1]
    target = out
    if out is None or out.stride(1) != 1 or out.device.type != "cpu":
        out = torch.empty(num_tokens, hidden, dtype=rows.dtype)
    if num_tokens == 0 or hidden == 0:
        return out if target is None else target
    row_index = row_index.to(torch.int32).contiguous()
    own_column, own_rows = own if own is not None else (-1, rows)
    lowest, highest = row_index.amin(0).tolist(), row_index.amax(0).tolist()
    for d in range(num_sources):
        num_rows = (own_rows if d == own_column else rows).shape[0]
        if lowest[d] < -1 or highest[d] >= num_rows:
            raise ValueError(f"row_index: column {d} holds rows outside [-1, {num_rows})")
    rows, own_rows = _unit_columns(rows), _unit_columns(own_rows)
    biases = tuple(_unit_columns(b) for b in biases)
    bias0 = biases[0] if len(biases) > 0 else out  # unused pointers: any valid tensor
    bias1 = biases[1] if len(biases) > 1 else out
    library.deep_ep_ordered_sum_bf16(
        rows.data_ptr(),
        rows.stride(0),
        own_rows.data_ptr(),
        own_rows.stride(0),
        own_column,
        row_index.data_ptr(),
        num_sources,
        bias0.data_ptr(),
        bias0.stride(0),
        bias1.data_ptr(),
        bias1.stride(0),
        len(biases),
        num_tokens,
        hidden,
        out.data_ptr(),
        out.stride(0),
    )
    return out if target is None else target.copy_(out)
