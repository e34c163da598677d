"""`gather_rows_beside(rows, index, out)`: out[i] = rows[index[i]], for a gather that runs beside an all-to-all.

On a GPU, torch's `index_select` fills every SM; queued on the caller's stream next to an all-to-all on NCCL's
stream it usually starts first and NCCL's kernel waits for its blocks to drain (the reference's dispatch on the
first and last rank: docs/PERFORMANCE.md, fourteenth and fifteenth sessions). Large CUDA gathers therefore take
a Triton kernel on `PROGRAMS` SMs when Triton is importable; smaller ones (where the device gains less than a
Triton launch costs the host), host tensors, and any gather after a failed launch take
`deep_ep.routing.gather_rows`. Both move the same bytes to the same rows. `DEEP_EP_TRITON=0` forces the torch
path.
"""

from __future__ import annotations

import logging
import os

import torch

from ..routing import _words, gather_rows
from . import triton_importable

__all__ = ["gather_rows_beside"]

log = logging.getLogger("deep_ep.kernels")
PROGRAMS = 16  # SMs the kernel may occupy (of 132 on an H200): 8 to 64 did as well on 2xH200, 4 were too few
MIN_BYTES = 32 << 20  # smaller gathers take index_select: a Triton launch costs the host more (33-80 us)
_error: str | None = None  # set when a launch raised: later calls take the torch path


def gather_rows_beside(rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = rows[index[i]] for byte rows [M, W] (out [len(index), W]), on few SMs where it pays."""
    global _error
    words, out_words = _words(rows), _words(out)
    usable = (
        rows.is_cuda
        and out.numel() >= MIN_BYTES
        and words.dtype == out_words.dtype
        and words.stride(1) == out_words.stride(1) == 1
        and _error is None
        and os.environ.get("DEEP_EP_TRITON", "1") != "0"
        and triton_importable("triton_row_gather")
    )
    if usable:
        from . import triton_row_gather

        try:
            triton_row_gather.gather_rows(words, index, out_words, PROGRAMS)
            return out
        except Exception as error:  # compile or launch refused (raised before any GPU work): same bytes below
            _error = f"{type(error).__name__}: {error}"[:500]
            log.warning("deep_ep: the Triton row-gather kernel failed; using index_select from now on: %s", error)
    return gather_rows(rows, index, out=out)
