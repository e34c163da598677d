"""`ordered_sum.ordered_gather_sum` for bf16 host tensors, in C (`host_ordered_sum.c`): same contract, same bits.

The host combine of 4 ranks spent most of its time beyond the all-to-all in this sum: gathered, widened and added
term by term with torch ops it took 6-9 ms per 512 tokens x 7168 on one core; one pass that reads each row once
and keeps the float32 sums in registers takes 2-3 ms.

The C file is compiled on first use with the system C compiler (`$CC`, split as a shell would, else `cc`/`gcc`;
about 0.3 s) into `$DEEP_EP_CACHE_DIR` (default `${XDG_CACHE_HOME:-~/.cache}/deep_ep`, else a temp directory
`deep_ep-<uid>`), named by a hash of the source and flags, and loaded with ctypes (which releases the GIL during
the call). A directory or library file that is not this user's own, or that others may write, is never used (a
loaded library runs as this process); a cached library that does not load is rebuilt. Where there is no
compiler, the build fails, or `DEEP_EP_HOST_KERNEL=0` is set, `usable` is False and callers take the torch
implementation;
`status()` says which and why. Every index is range-checked here before the C code reads memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["ordered_gather_sum", "status", "usable"]

log = logging.getLogger("deep_ep.kernels")
_SOURCE = Path(__file__).with_name("host_ordered_sum.c")
_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-Wno-psabi"]
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def _private(path: Path) -> bool:
    """Whether `path` belongs to this user and nobody else may write it: a library loaded from there runs as this
    process, so a directory or file another user could write is never used."""
    try:
        info = path.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _cache_dir() -> Path | str:
    """$DEEP_EP_CACHE_DIR, else the first of $XDG_CACHE_HOME/deep_ep (~/.cache/deep_ep) and a temp directory
    that is (or can be made) this user's own, writable directory; or why there is none."""
    configured = os.environ.get("DEEP_EP_CACHE_DIR")
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deep_ep"
    candidates = [Path(configured)] if configured else [home, Path(tempfile.gettempdir()) / f"deep_ep-{os.getuid()}"]
    for directory in candidates:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        if _private(directory) and os.access(directory, os.W_OK | os.X_OK):
            return directory
    return f"no cache directory of this user's that only it can write among {[str(c) for c in candidates]}"


_LOCK = threading.Lock()  # one build per process, however many threads ask at once
_loaded: ctypes.CDLL | str | None = None


def _library() -> ctypes.CDLL | str:
    """The loaded library, or why there is none (a compiler that fails is worth a warning: the sum is slower)."""
    global _loaded
    with _LOCK:
        if _loaded is None:
            _loaded = _build_and_load()
            if isinstance(_loaded, str):
                log.warning("deep_ep: the host C ordered sum is unavailable, torch ops sum instead: %s", _loaded)
        return _loaded


def _build_and_load() -> ctypes.CDLL | str:
    configured = os.environ.get("CC")
    compiler = shlex.split(configured) if configured else [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler or not compiler[0]:
        return "no C compiler ($CC, cc or gcc) on PATH"
    directory = _cache_dir()
    if isinstance(directory, str):
        return directory
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([*_FLAGS, platform.machine()]).encode()).hexdigest()[:16]
    target = directory / f"host_ordered_sum-{key}.so"
    library = _load(target) if target.exists() else "not built yet"
    if isinstance(library, str):  # not there, or not loadable (truncated, stale, foreign): build it afresh
        library = _build(compiler, target)
    return library


def _build(compiler: list[str], target: Path) -> ctypes.CDLL | str:
    """Compile into a fresh file beside `target`, load it from there, then move it into place (ranks and threads
    may build at once). Loaded by its fresh name: a stale library this process already loaded from `target`
    would be handed back again under that name."""
    try:
        handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
        os.close(handle)
        try:
            built = subprocess.run(
                [*compiler, *_FLAGS, str(_SOURCE), "-o", partial], capture_output=True, text=True, timeout=120
            )
            if built.returncode != 0:
                return f"{' '.join(compiler)} failed: {built.stderr.strip()[-500:]}"  # the error comes last
            os.chmod(partial, 0o755)  # whatever the umask: _load refuses files others may write
            library = _load(Path(partial))
            if not isinstance(library, str):
                os.replace(partial, target)
                library._name = str(target)  # what status() reports
            return library
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
    except (OSError, subprocess.SubprocessError) as error:
        return f"building {target} failed: {error}"


def _load(target: Path) -> ctypes.CDLL | str:
    if not _private(target):
        return f"{target} may be written by other users: not loaded"
    try:
        library = ctypes.CDLL(str(target))
        entry = library.deep_ep_ordered_sum_bf16
    except (OSError, AttributeError) as error:
        return f"loading {target} failed: {error}"
    entry.argtypes = [_PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64]
    entry.restype = None
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
    own_column, own_rows = own if own is not None else (-1, rows)
    lowest, highest = row_index.amin(0).tolist(), row_index.amax(0).tolist()  # before the narrowing to int32
    for d in range(num_sources):
        num_rows = (own_rows if d == own_column else rows).shape[0]
        if lowest[d] < -1 or highest[d] >= num_rows:
            raise ValueError(f"row_index: column {d} holds rows outside [-1, {num_rows})")
    row_index = row_index.to(torch.int32).contiguous()
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
