"""Triton kernel of `deep_ep.kernels.ordered_sum.ordered_gather_sum` (CUDA tensors of bf16/fp16/fp32).

One program per (token, block of BLOCK columns): it loads the token's biases and then, for each source
d = 0..R-1 in order, the row `row_index[t, d]` (masked to +0.0 when absent; source OWN's rows from their own
tensor), adding each in float32, and stores one rounding to the output dtype (round to nearest even, Triton's
default for down-casts). Each row is read exactly once. Only adds appear, so no FMA contraction can change the
rounding.

This module imports Triton at import time; `ordered_sum` imports it only when a CUDA tensor needs it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_device


@triton.jit
def _ordered_gather_sum_kernel(
    out_ptr,
    rows_ptr,
    index_ptr,
    bias0_ptr,
    bias1_ptr,
    own_ptr,
    hidden,
    out_stride,
    rows_stride,
    index_stride,
    bias0_stride,
    bias1_stride,
    own_stride,
    NUM_SOURCES: tl.constexpr,
    NUM_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    OWN: tl.constexpr = -1,  # the source whose rows `own_ptr` holds (-1: none)
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if NUM_BIAS >= 1:
        b0 = tl.load(bias0_ptr + token * bias0_stride + cols, mask=mask, other=0.0)
        acc = acc + b0.to(tl.float32)
    if NUM_BIAS >= 2:
        b1 = tl.load(bias1_ptr + token * bias1_stride + cols, mask=mask, other=0.0)
        acc = acc + b1.to(tl.float32)
    for d in tl.static_range(NUM_SOURCES):
        row = tl.load(index_ptr + token * index_stride + d).to(tl.int64)
        present = row >= 0
        safe_row = tl.where(present, row, 0)  # never form an address from -1, even masked
        # An absent row masks every column (a comparison, not `mask & present`: Triton 3.9's interpreter
        # rejects the mask that the scalar-and-vector `&` makes).
        row_mask = cols < tl.where(present, hidden, 0)
        if d == OWN:
            values = tl.load(own_ptr + safe_row * own_stride + cols, mask=row_mask, other=0.0)
        else:
            values = tl.load(rows_ptr + safe_row * rows_stride + cols, mask=row_mask, other=0.0)
        acc = acc + values.to(tl.float32)
    tl.store(out_ptr + token * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_for(hidden: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(hidden, 1))))


def ordered_gather_sum(
    rows: torch.Tensor,
    row_index: torch.Tensor,
    biases: tuple[torch.Tensor, ...] = (),
    out: torch.Tensor | None = None,
    own: tuple[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Launch the kernel on rows' device and current stream; arguments as `ordered_sum.ordered_gather_sum`."""
    num_tokens, num_sources = row_index.shape
    hidden = rows.shape[1]
    if out is None or out.stride(1) != 1:  # the kernel writes rows of unit column stride
        target, out = out, torch.empty(num_tokens, hidden, dtype=rows.dtype, device=rows.device)
    else:
        target = None
    if num_tokens == 0 or hidden == 0:
        return out if target is None else target
    if rows.stride(1) != 1 and rows.shape[0] > 0:
        rows = rows.contiguous()
    row_index = row_index.contiguous()
    biases = tuple(b if b.stride(1) == 1 else b.contiguous() for b in biases)
    bias0 = biases[0] if len(biases) > 0 else out  # unused pointers still need a valid tensor
    bias1 = biases[1] if len(biases) > 1 else out
    own_column, own_rows = own if own is not None else (-1, out)
    if own_rows.stride(1) != 1 and own_rows.shape[0] > 0:
        own_rows = own_rows.contiguous()
    block = _block_for(hidden)
    grid = (num_tokens, triton.cdiv(hidden, block))
    # Triton launches on the *current* device's stream: make it the rows' device. (CPU tensors reach here
    # only under TRITON_INTERPRET=1, which the CPU tests use to run the kernel's logic.)
    with on_device(rows.device):
        _ordered_gather_sum_kernel[grid](
            out,
            rows,
            row_index,
            bias0,
            bias1,
            own_rows,
            hidden,
            out.stride(0),
            rows.stride(0),
            row_index.stride(0),
            bias0.stride(0),
            bias1.stride(0),
            own_rows.stride(0),
            NUM_SOURCES=num_sources,
            NUM_BIAS=len(biases),
            BLOCK=block,
            OWN=own_column,
            num_warps=4 if block >= 512 else 1,
        )
    return out if target is None else target.copy_(out)
