"""Triton kernel of `deep_ep.kernels.row_gather.gather_rows_beside`: out[i] = src[index[i]] on a few SMs.

A persistent grid of `programs` programs strides over tiles of whole rows (any element type: the rows are moved
as they are, no arithmetic). Its point is the small grid: `index_select` launches enough blocks to fill every
SM, so a gather queued beside an all-to-all delays NCCL's kernel until the gather's blocks drain; this one
leaves the other SMs free.

This module imports Triton at import time; `row_gather` imports it only when a CUDA tensor needs it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_device


@triton.jit
def _gather_rows_kernel(
    src,  # [*, WORDS] elements, row stride `src_stride`
    index,  # int32 or int64 [num_rows]: the src row of each output row
    out,  # [num_rows, WORDS] elements, row stride `out_stride`
    num_rows,
    src_stride,
    out_stride,
    WORDS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    step = tl.num_programs(0) * ROWS
    cols = tl.arange(0, BLOCK)
    for first in range(tl.program_id(0) * ROWS, num_rows, step):
        rows = first + tl.arange(0, ROWS)
        live = rows < num_rows
        source = tl.load(index + rows, mask=live, other=0).to(tl.int64)
        for start in tl.static_range(0, WORDS, BLOCK):
            mask = live[:, None] & (start + cols < WORDS)[None, :]
            values = tl.load(src + source[:, None] * src_stride + (start + cols)[None, :], mask=mask)
            tl.store(out + rows.to(tl.int64)[:, None] * out_stride + (start + cols)[None, :], values, mask=mask)


def gather_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor, programs: int) -> torch.Tensor:
    """out[i] = src[index[i]] for 2-D src/out of one dtype (unit column stride) and an integer index, on at most
    `programs` programs, on the current stream of src's device."""
    num_rows, words = out.shape
    if num_rows == 0 or words == 0:
        return out
    block = min(4096, triton.next_power_of_2(words))
    rows = max(1, 8192 // block)  # about 8192 elements per tile
    grid = (max(1, min(programs, triton.cdiv(num_rows, rows))),)
    # Triton launches on the current device's stream (CPU tensors reach here only under TRITON_INTERPRET=1).
    with on_device(src.device):
        _gather_rows_kernel[grid](
            src, index, out, num_rows, src.stride(0), out.stride(0), WORDS=words, ROWS=rows, BLOCK=block, num_warps=8
        )
    return out
