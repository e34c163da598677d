"""Expert-grouped permutation: from dispatch's one-row-per-token layout to rows grouped by local expert.

A normal-mode dispatch delivers each token once per destination rank (`recv_x [M, H]`), with
`recv_topk_idx [M, K]` naming the local experts it picked there (`-1` elsewhere). Grouped GEMMs want one
row per (token, local expert) pair, grouped by expert. `permute` builds that layout; `unpermute` is its
inverse for the expert outputs: it applies the top-k weights and sums each received row's local experts,
giving the `[M, H]` tensor that `combine` takes. Both are differentiable.

Layout of `permute`'s output (`P` rows):
- local expert `e`'s rows occupy `[offset_e, offset_e + tokens_per_expert[e])`, experts ascending, where
  `tokens_per_expert[e]` is the pair count rounded up to `expert_alignment` and `offset_e` their prefix sum;
- within an expert, rows follow the received row `i` ascending (then `k`): source rank, then source token,
  the order SPEC section 4 gives `recv_x`;
- alignment padding rows, and any rows past `sum(tokens_per_expert)` when `num_out_tokens` fixes `P`, are
  zero and read by nothing.

Arithmetic (each step a separate IEEE operation, no fused multiply-add), with `acc` = float64 when an
operand is float64, else float32:
- `unpermute`: `out[i] = sum over k ascending of acc(w[i, k]) * acc(y[pos(i, k)])` from +0.0, rounded once
  to `y`'s dtype (the same rule as SPEC 6.3's low-latency combine);
- backward of `permute`: `grad_x[i] = sum over k ascending of acc(grad[pos(i, k)])` from +0.0, one rounding.

No host synchronisation happens when the output size is known on the host: pass dispatch's
`num_recv_tokens_per_expert_list` (made with the same `expert_alignment`) or a fixed `num_out_tokens`.
Value checks (expert ids in range, size hints) raise ValueError on the CPU; on a device they are
asynchronous device asserts (`torch._assert_async`) whose message names the argument, so they cost no sync.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from . import checks

__all__ = ["PermuteHandle", "PermuteResult", "permute", "unpermute"]


@dataclass(frozen=True)
class PermuteHandle:
    """How `permute` placed rows; `unpermute` and the backward passes use it.

    position: int64 [M, K], row of pair (i, k) in the permuted tensor, or `num_rows` where
        `recv_topk_idx[i, k] == -1`.
    source_pair: int64 [num_rows], flat pair index i * K + k of each permuted row, or M * K for padding.
    source_row: int64 [num_rows], received row i of each permuted row, or `num_recv` for a padding row.
    tokens_per_expert: int64 [L] (device), rows of each expert's group, padding included (aligned).
    num_real_tokens_per_expert: int64 [L] (device), (token, expert) pairs per expert, padding excluded.
    num_recv: M. num_rows: P.
    """

    position: torch.Tensor
    source_pair: torch.Tensor
    source_row: torch.Tensor
    tokens_per_expert: torch.Tensor
    num_real_tokens_per_expert: torch.Tensor
    num_recv: int
    num_rows: int

    @property
    def valid(self) -> torch.Tensor:
        """bool [M, K]: which (row, k) pairs name a local expert."""
        return self.position < self.num_rows


class PermuteResult(NamedTuple):
    """permuted_x [P, H] (recv_x's dtype); tokens_per_expert int64 [L] (device, aligned); handle."""

    permuted_x: torch.Tensor
    tokens_per_expert: torch.Tensor
    handle: PermuteHandle


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _layout(
    topk_idx: torch.Tensor,
    num_local_experts: int,
    expert_alignment: int,
    num_tokens_per_expert: list[int] | None,
    num_out_tokens: int | None,
) -> PermuteHandle:
    """Place every valid (i, k) pair; device ops only, unless neither size hint is given."""
    num_recv, num_topk = topk_idx.shape
    device = topk_idx.device
    experts = num_local_experts
    flat = topk_idx.reshape(-1).long()
    _check(
        ((flat >= -1) & (flat < experts)).all(),
        lambda: _bad_id_message(topk_idx, experts),
        "recv_topk_idx has an entry that is neither -1 nor a local expert id in [0, num_local_experts)",
    )
    key = torch.where(flat >= 0, flat, experts)  # -1 sorts last, into a dropped bucket
    pairs = torch.zeros(experts + 1, dtype=torch.long, device=device)
    pairs.scatter_add_(0, key, torch.ones_like(key))
    real = pairs[:experts]
    aligned = (real + expert_alignment - 1) // expert_alignment * expert_alignment

    if num_out_tokens is not None:
        num_rows = num_out_tokens
    elif num_tokens_per_expert is not None:
        num_rows = sum(num_tokens_per_expert)
    else:
        num_rows = int(aligned.sum())  # the host synchronisation the hints avoid
    if num_tokens_per_expert is not None:
        _check(
            (aligned == _host_ints_on(num_tokens_per_expert, device)).all(),
            lambda: (
                f"num_tokens_per_expert={num_tokens_per_expert} does not match recv_topk_idx, which "
                f"gives {aligned.tolist()} rows per expert with expert_alignment={expert_alignment}"
            ),
            "num_tokens_per_expert does not match recv_topk_idx",
        )
    if num_out_tokens is not None:
        total = aligned.sum()
        _check(
            total <= num_out_tokens,
            lambda: (
                f"num_out_tokens={num_out_tokens} is smaller than the {int(total)} rows that recv_topk_idx "
                f"needs with expert_alignment={expert_alignment}"
            ),
            "num_out_tokens is smaller than the rows recv_topk_idx needs",
        )

    # Pairs sorted by (expert, i, k): a stable sort of the expert key keeps the flat (i, k) order.
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    raw_start = pairs.cumsum(0) - pairs
    aligned_start = torch.cat([aligned.cumsum(0) - aligned, aligned.new_full((1,), num_rows)])
    rank_in_expert = torch.arange(flat.numel(), device=device) - raw_start[sorted_key]
    placed = torch.where(sorted_key < experts, aligned_start[sorted_key] + rank_in_expert, num_rows)
    placed = placed.clamp(max=num_rows)  # only reachable when a failed device check did not stop us
    position = torch.empty_like(placed)
    position[order] = placed
    source_pair = torch.full((num_rows + 1,), flat.numel(), dtype=torch.long, device=device)
    # Every unused pair writes into the trash slot num_rows; which one lands there does not matter.
    source_pair.scatter_(0, position, torch.arange(flat.numel(), device=device))
    source_pair = source_pair[:num_rows]
    source_row = source_pair // num_topk if num_topk else torch.full_like(source_pair, num_recv)
    return PermuteHandle(position.view(num_recv, num_topk), source_pair, source_row, aligned, real, num_recv, num_rows)


def _check(ok: torch.Tensor, message: Callable[[], str], device_message: str) -> None:
    """On the CPU, raise ValueError(message()) when `ok` is false (reading it is free); on a device, assert
    asynchronously, without a host sync: a failure is a device-side assert that prints `device_message`."""
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message())
    else:
        torch._assert_async(ok, f"deep_ep.permute: {device_message}")


def _bad_id_message(topk_idx: torch.Tensor, experts: int) -> str:
    index = [int(i) for i in ((topk_idx < -1) | (topk_idx >= experts)).nonzero()[0]]
    return (
        f"recv_topk_idx{index} = {int(topk_idx[tuple(index)])} is not a local expert id: entries must be -1 or in "
        f"[0, num_local_experts={experts})"
    )


def _host_ints_on(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 [len(values)] on `device` without a host sync: an asynchronous copy from pinned memory, which
    torch's caching host allocator keeps until the copy ran (and never reuses once a CUDA graph captured it)."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.long)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def _padded(t: torch.Tensor) -> torch.Tensor:
    """t with one zero row appended: index `len(t)` reads zeros."""
    return torch.cat([t, t.new_zeros(1, *t.shape[1:])])


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, handle: PermuteHandle) -> torch.Tensor:
        ctx.handle = handle
        return _padded(x).index_select(0, handle.source_row)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        handle: PermuteHandle = ctx.handle
        gathered = _padded(grad)[handle.position]  # [M, K, H]
        acc_dtype = _acc_dtype(grad)
        acc = grad.new_zeros(handle.num_recv, *grad.shape[1:], dtype=acc_dtype)
        for k in range(gathered.shape[1]):
            acc = acc + gathered[:, k].to(acc_dtype)
        return acc.to(grad.dtype), None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, weights: torch.Tensor, handle: PermuteHandle) -> torch.Tensor:
        ctx.handle = handle
        ctx.save_for_backward(y, weights)
        acc_dtype = _acc_dtype(y, weights)
        gathered = _padded(y)[handle.position]  # [M, K, H]; invalid pairs read the zero row
        w = torch.where(handle.valid, weights.to(acc_dtype), 0)
        acc = y.new_zeros(handle.num_recv, *y.shape[1:], dtype=acc_dtype)
        for k in range(gathered.shape[1]):
            acc = acc + w[:, k : k + 1] * gathered[:, k].to(acc_dtype)  # multiply rounded, then added
        return acc.to(y.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        handle: PermuteHandle = ctx.handle
        y, weights = ctx.saved_tensors
        acc_dtype = _acc_dtype(y, weights)
        valid = handle.valid
        w = torch.where(valid, weights.to(acc_dtype), 0)
        # Permuted row p of pair (i, k) gets w[i, k] * grad[i]; padding rows read weight 0 and a zero row.
        w_of_row = _padded(w.reshape(-1))[handle.source_pair]
        grad_y = (w_of_row.unsqueeze(1) * _padded(grad)[handle.source_row].to(acc_dtype)).to(y.dtype)
        gathered = _padded(y)[handle.position].to(acc_dtype)  # [M, K, H]
        grad_w = (gathered * grad.to(acc_dtype).unsqueeze(1)).sum(-1)
        grad_w = torch.where(valid, grad_w, 0).to(weights.dtype)
        return grad_y, grad_w, None


def permute(
    recv_x: torch.Tensor,
    recv_topk_idx: torch.Tensor,
    num_local_experts: int,
    *,
    expert_alignment: int = 1,
    num_tokens_per_expert: Sequence[int] | None = None,
    num_out_tokens: int | None = None,
) -> PermuteResult:
    """Copy each received row once per local expert it selected, grouped by expert (differentiable in x).

    Arguments:
        recv_x: [M, H] any float dtype, dispatch's `recv_x` (M = num_recv, or num_worst_tokens).
        recv_topk_idx: int64/int32 [M, K], dispatch's local expert ids, -1 = not here (checked: ValueError
            on the CPU, an asynchronous device assert naming recv_topk_idx elsewhere).
        num_local_experts: L, experts of this rank.
        expert_alignment: each expert's group is padded with zero rows to a multiple of this.
        num_tokens_per_expert: optional host ints [L] (not a tensor), dispatch's
            `num_recv_tokens_per_expert_list` made with the same `expert_alignment`: sizes the output without
            a host sync (checked like recv_topk_idx; copied to the device from pinned memory, asynchronously).
        num_out_tokens: optional fixed output size P >= the rows needed (for `num_worst_tokens` dispatch or
            CUDA graphs); rows past the last group are zero. Without either hint, one host sync sizes P.
    Returns:
        PermuteResult(permuted_x [P, H] of recv_x's dtype, tokens_per_expert int64 [L] on recv_x's device
        (group sizes, alignment included), handle for `unpermute`).
    """
    if not isinstance(recv_x, torch.Tensor) or recv_x.dim() != 2:
        raise ValueError(f"recv_x must be a 2-D tensor [M, H], got {_describe(recv_x)}")
    if not isinstance(recv_topk_idx, torch.Tensor) or recv_topk_idx.dim() != 2:
        raise ValueError(f"recv_topk_idx must be a 2-D tensor [M, K], got {_describe(recv_topk_idx)}")
    if recv_topk_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"recv_topk_idx must be int64 or int32, got {recv_topk_idx.dtype}")
    if recv_topk_idx.shape[0] != recv_x.shape[0]:
        raise ValueError(f"recv_topk_idx has {recv_topk_idx.shape[0]} rows but recv_x has {recv_x.shape[0]}")
    if recv_topk_idx.device != recv_x.device:
        raise ValueError(f"recv_topk_idx is on {recv_topk_idx.device}, recv_x on {recv_x.device}")
    num_local_experts = checks.integer("num_local_experts", num_local_experts, minimum=1)
    expert_alignment = checks.integer("expert_alignment", expert_alignment, minimum=1)
    if num_out_tokens is not None:
        num_out_tokens = checks.integer("num_out_tokens", num_out_tokens, minimum=0)
    if num_tokens_per_expert is not None:
        num_tokens_per_expert = _host_counts(num_tokens_per_expert, num_local_experts)
    handle = _layout(recv_topk_idx, num_local_experts, expert_alignment, num_tokens_per_expert, num_out_tokens)
    return PermuteResult(_Permute.apply(recv_x, handle), handle.tokens_per_expert, handle)


def unpermute(
    expert_out: torch.Tensor, handle: PermuteHandle, recv_topk_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight each expert output row and sum them per received row: the inverse of `permute`, for `combine`.

    Arguments:
        expert_out: [P, H] float (bf16/fp16/fp32/fp64), rows in `permute`'s layout (padding rows unread).
        handle: the `PermuteHandle` of the matching `permute`.
        recv_topk_weights: float [M, K] (dispatch's, float32; float64 for gradcheck), or None for weight 1.
    Returns:
        [M, H] of expert_out's dtype: row i = sum over k ascending with recv_topk_idx[i, k] >= 0 of
        w[i, k] * expert_out[pos(i, k)] in fp32 (fp64 if an operand is fp64), one rounding; rows with no
        local expert are 0. Differentiable in expert_out and recv_topk_weights.
    """
    if not isinstance(handle, PermuteHandle):
        raise TypeError(f"handle must be the PermuteHandle that permute returned, got {type(handle).__name__}")
    if not isinstance(expert_out, torch.Tensor) or expert_out.dim() != 2 or expert_out.shape[0] != handle.num_rows:
        raise ValueError(f"expert_out must be [{handle.num_rows}, H] (permute's rows), got {_describe(expert_out)}")
    if not expert_out.is_floating_point():
        raise TypeError(f"expert_out must be a floating-point tensor, got {expert_out.dtype}")
    shape = tuple(handle.position.shape)
    if recv_topk_weights is None:
        recv_topk_weights = torch.ones(shape, dtype=torch.float32, device=expert_out.device)
    elif not isinstance(recv_topk_weights, torch.Tensor) or tuple(recv_topk_weights.shape) != shape:
        raise ValueError(f"recv_topk_weights must be [{shape[0]}, {shape[1]}], got {_describe(recv_topk_weights)}")
    elif not recv_topk_weights.is_floating_point():
        raise TypeError(f"recv_topk_weights must be a floating-point tensor, got {recv_topk_weights.dtype}")
    for name, tensor in (("expert_out", expert_out), ("recv_topk_weights", recv_topk_weights)):
        if tensor.device != handle.position.device:
            raise ValueError(f"{name} is on {tensor.device}, but permute's handle is on {handle.position.device}")
    return _Unpermute.apply(expert_out, recv_topk_weights, handle)


def _host_counts(values: Any, num_local_experts: int) -> list[int]:
    """The size hint as host ints (they size the output on the host; a tensor would need a sync to read)."""
    if isinstance(values, torch.Tensor):
        raise TypeError(
            "num_tokens_per_expert must be host ints (dispatch's num_recv_tokens_per_expert_list), got a tensor"
        )
    if len(values) != num_local_experts:
        raise ValueError(
            f"num_tokens_per_expert has {len(values)} entries, one per local expert "
            f"(num_local_experts={num_local_experts}) expected"
        )
    return [checks.integer(f"num_tokens_per_expert[{e}]", n, minimum=0) for e, n in enumerate(values)]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__
