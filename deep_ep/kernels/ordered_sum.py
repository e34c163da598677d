"""The combine reduction of SPEC section 5 as a gather: `ordered_gather_sum(rows, row_index, biases)`.

`out[t]` = one rounding, to `rows.dtype`, of the float32 sum that starts from +0.0 and adds, in this order,
`biases[0][t]`, `biases[1][t]`, then `rows[row_index[t, d]]` for d = 0..R-1 wherever `row_index[t, d] >= 0`.
Every addition is a separate float32 rounding (there is no multiply, so nothing can be fused into an FMA).
float64 rows are summed in float64 (the reference backend does the same, for gradcheck).

Adding +0.0 where a row is absent instead of skipping it gives the same bits: the accumulator starts at
+0.0 and a round-to-nearest sum is -0.0 only when both operands are -0.0, so it is never -0.0 and
`acc + 0.0 == acc` bit for bit (NaN and infinities included). Both implementations rely on that to stay
branch-free.

On CUDA tensors of bf16/fp16/fp32 with Triton importable, a Triton kernel reads each row once; on bf16 host
tensors, a C kernel does (`host_ordered_sum`, compiled on first use where a C compiler is); anywhere else the
torch implementation below runs. `DEEP_EP_TRITON=0` / `DEEP_EP_HOST_KERNEL=0` force the torch implementation.
"""

from __future__ import annotations

import logging
import os

import torch

from . import host_ordered_sum, triton_importable

__all__ = ["ordered_gather_sum", "row_index_from_splits", "status", "triton_usable"]

log = logging.getLogger("deep_ep.kernels")
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_triton_error: str | None = None  # set when a launch raised: later calls take the torch path (same bits)


def row_index_from_splits(send_tokens: torch.Tensor, send_splits: list[int], num_tokens: int) -> torch.Tensor:
    """int32 [N, R]: row_index[t, d] = the row of `send_tokens` that token t sent to rank d, else -1.

    `send_tokens` (int64) lists the token of each sent row grouped by destination (`send_splits[d]` rows
    for rank d, destinations ascending), as an exact `deep_ep.routing.Route` holds it; the rows returned
    by combine come back in that same order. Builds on the tokens' device without a host round trip.
    """
    num_ranks = len(send_splits)
    total = sum(send_splits)
    device = send_tokens.device
    index = torch.full((num_tokens, num_ranks), -1, dtype=torch.int32, device=device)
    if total == 0:
        return index
    # The splits are host ints; a non-blocking copy keeps the host from waiting on the stream.
    repeats = torch.tensor(send_splits, dtype=torch.long).to(device, non_blocking=True)
    destination = torch.repeat_interleave(torch.arange(num_ranks, device=device), repeats, output_size=total)
    # Each (token, destination) pair occurs at most once, so this plain scatter is deterministic.
    index[send_tokens[:total], destination] = torch.arange(total, dtype=torch.int32, device=device)
    return index


def triton_usable(rows: torch.Tensor) -> bool:
    """Whether `ordered_gather_sum` would run the Triton kernel for these rows."""
    return (
        rows.is_cuda
        and rows.dtype in _TRITON_DTYPES
        and _triton_error is None
        and os.environ.get("DEEP_EP_TRITON", "1") != "0"
        and triton_importable("triton_ordered_sum")
    )


def status() -> str:
    """Which implementation CUDA tensors get: "triton", or "torch (why)"."""
    if os.environ.get("DEEP_EP_TRITON", "1") == "0":
        return "torch (DEEP_EP_TRITON=0)"
    if _triton_error is not None:
        return f"torch (the Triton launch failed: {_triton_error})"
    if not triton_importable("triton_ordered_sum"):
        return "torch (Triton cannot be imported)"
    return "triton"


def _check(
    rows: torch.Tensor,
    row_index: torch.Tensor,
    biases: tuple[torch.Tensor, ...],
    own: tuple[int, torch.Tensor] | None = None,
) -> None:
    if rows.dim() != 2:
        raise ValueError(f"rows must be 2-D [M, H], got shape {list(rows.shape)}")
    if own is not None:
        column, own_rows = own
        if not 0 <= column < row_index.shape[1]:
            raise ValueError(f"own: column {column} is not a source of row_index [N, {row_index.shape[1]}]")
        if (
            own_rows.dim() != 2
            or own_rows.shape[1] != rows.shape[1]
            or own_rows.dtype != rows.dtype
            or own_rows.device != rows.device
        ):
            raise ValueError(
                f"own: rows must be {rows.dtype} [M, {rows.shape[1]}] on {rows.device}, "
                f"got {own_rows.dtype} {list(own_rows.shape)} on {own_rows.device}"
            )
    if row_index.dim() != 2 or row_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"row_index must be int32/int64 [N, R], got {row_index.dtype} {list(row_index.shape)}")
    if len(biases) > 2:
        raise ValueError(f"at most two biases, got {len(biases)}")
    num_tokens, hidden = row_index.shape[0], rows.shape[1]
    for i, b in enumerate(biases):
        if b.shape != (num_tokens, hidden) or b.dtype != rows.dtype or b.device != rows.device:
            raise ValueError(
                f"biases[{i}] must be {rows.dtype} [{num_tokens}, {hidden}] on {rows.device}, "
                f"got {b.dtype} {list(b.shape)} on {b.device}"
            )


def ordered_gather_sum(
    rows: torch.Tensor,
    row_index: torch.Tensor,
    biases: tuple[torch.Tensor, ...] = (),
    out: torch.Tensor | None = None,
    own: tuple[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """[N, H] of rows.dtype: the SPEC 5 sum for each token (module docstring).

    rows: [M, H] (any row stride, unit column stride for the Triton kernel); row_index: int [N, R], -1 =
    absent; biases: up to two [N, H] tensors of rows.dtype, added first. own: (source d, its rows [M', H]):
    column d of row_index indexes these rows instead of `rows` (a rank's rows to itself, read where they are
    instead of being copied next to the others). The result is `out` ([N, H] of rows.dtype, written in place)
    if given, else a fresh tensor.
    """
    global _triton_error
    _check(rows, row_index, biases, own)
    if out is not None and (out.shape != (row_index.shape[0], rows.shape[1]) or out.dtype != rows.dtype):
        want = f"[{row_index.shape[0]}, {rows.shape[1]}] {rows.dtype}"
        raise ValueError(f"out: expected {want}, got {list(out.shape)} {out.dtype}")
    if triton_usable(rows):
        from . import triton_ordered_sum

        try:
            return triton_ordered_sum.ordered_gather_sum(rows, row_index, biases, out, own)
        except Exception as error:  # compile or launch refused (raised before any GPU work): same bits below
            _triton_error = f"{type(error).__name__}: {error}"[:500]
            log.warning("deep_ep: the Triton ordered-sum kernel failed; using torch ops from now on: %s", error)
    if host_ordered_sum.usable(rows):
        return host_ordered_sum.ordered_gather_sum(rows, row_index, biases, out, own)
    result = torch_ordered_gather_sum(rows, row_index, biases, own)
    return result if out is None else out.copy_(result)


def torch_ordered_gather_sum(
    rows: torch.Tensor,
    row_index: torch.Tensor,
    biases: tuple[torch.Tensor, ...] = (),
    own: tuple[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The same sum with plain torch ops (any device): the fallback, and the kernel's executable contract."""
    _check(rows, row_index, biases, own)
    acc_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    num_tokens, num_sources = row_index.shape
    acc = torch.zeros(num_tokens, rows.shape[1], dtype=acc_dtype, device=rows.device)
    for b in biases:
        acc += b.to(acc_dtype)
    for d in range(num_sources):
        source = own[1] if own is not None and d == own[0] else rows
        if source.shape[0] == 0:  # nothing came back from d: every entry is -1
            continue
        index = row_index[:, d].long()
        present = (index >= 0).unsqueeze(1)
        values = source.index_select(0, index.clamp(min=0)).to(acc_dtype)
        acc += torch.where(present, values, torch.zeros_like(values))  # +0.0 where absent: same bits
    return acc.to(rows.dtype)
