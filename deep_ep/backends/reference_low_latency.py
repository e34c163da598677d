"""Low-latency mode of the reference backend (SPEC section 6): fixed-size exchanges, no host round trip.

Dispatch sends every token once to each rank that holds one of its experts, in a [R, T] grid of slots
(slot t = token t), with the token's local expert ids for that rank attached; the receiver expands the
messages into per-expert rows in SPEC order (source, token, k). Combine sends each expert row back to a
[R, T, min(K, L)] grid; the source weights and sums them in k order. Every size depends only on T, H, K,
L and R, so both calls are CUDA-graph capturable on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import quant
from ..comm import Pending
from ..packing import RowFormat
from ..routing import gather_rows
from .base import LowLatencyDispatchArgs


@dataclass
class LowLatencyRoute:
    """What combine needs from dispatch: for each combine slot (s, t, j), the output row that fills it."""

    num_max_dispatch_tokens_per_rank: int
    num_topk: int
    slots_per_token: int  # Kc = min(K, L): a token meets at most that many distinct experts on one rank
    slot_rows: torch.Tensor  # int64 [R*T*Kc]: flat row of [L*R*T] (L*R*T = none)


def _rank_or_unique(valid: torch.Tensor, dest_rank: torch.Tensor) -> torch.Tensor:
    """dest_rank where valid, else a distinct negative value per k, so invalid entries match nothing."""
    unique = -1 - torch.arange(valid.shape[-1], device=valid.device)
    return torch.where(valid, dest_rank.long(), unique)


def _slot_in_rank(dest_rank: torch.Tensor) -> torch.Tensor:
    """int64 [..., K]: for each k, how many earlier k' of the same token go to the same rank."""
    same = dest_rank.unsqueeze(-1) == dest_rank.unsqueeze(-2)  # [..., K(k), K(k')]
    earlier = torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril(-1)
    return (same & earlier).sum(-1)


class LowLatencyMixin:
    """Adds low_latency_dispatch / low_latency_combine to the reference backend."""

    def low_latency_dispatch(self, args: LowLatencyDispatchArgs) -> tuple[dict, LowLatencyRoute, Pending]:
        comm = self.comm
        num_ranks, x, topk_idx = comm.size, args.x, args.topk_idx
        num_tokens, hidden = x.shape
        num_topk = topk_idx.shape[1]
        tokens_cap = args.num_max_dispatch_tokens_per_rank
        experts_per_rank = args.num_experts // num_ranks
        device = x.device

        if not args.use_fp8:
            fields = {"x": x}
        elif args.quant == "int8":
            q, scale = quant.per_token_cast_to_int8(x)
            fields = {"x": q, "scales": scale}
        else:
            q, scales = quant.per_block_cast_to_fp8(x, round_scale=args.round_scale, use_ue8m0=args.use_ue8m0)
            fields = {"x": q, "scales": scales}
        valid = topk_idx >= 0
        dest = torch.where(valid, topk_idx // experts_per_rank, -1)
        ranks = torch.arange(num_ranks, device=device).view(num_ranks, 1, 1)
        # ids[d, t, k]: the local expert on rank d that (t, k) selects, else -1.
        ids = torch.where(dest.unsqueeze(0) == ranks, (topk_idx % experts_per_rank).unsqueeze(0), -1).int()
        # A byte view needs stride(-1) == 1, which "contiguous" tensors with a size-0 or size-1 dim (N = 0,
        # or H = 128: one scale per row) need not have.
        fields = {name: _dense(t) for name, t in fields.items()}
        fmt = RowFormat.of(**fields)
        payload = fmt.pack(**fields)
        send = torch.zeros(num_ranks, tokens_cap, fmt.width + 4 * num_topk, dtype=torch.uint8, device=device)
        send[:, :num_tokens, : fmt.width] = payload.unsqueeze(0)
        send[:, :, fmt.width :] = 255  # int32 -1 in every id byte: empty slots select nothing
        send[:, :num_tokens, fmt.width :] = _dense(ids).view(torch.uint8).view(num_ranks, num_tokens, 4 * num_topk)
        received = torch.empty_like(send)
        pending = comm.all_to_all(received.view(-1), send.view(-1), "low_latency_dispatch")

        rows = num_ranks * tokens_cap
        out = _empty_ll_outputs(fields, args, experts_per_rank, rows, device)
        slots_per_token = min(num_topk, experts_per_rank)
        route = LowLatencyRoute(
            tokens_cap,
            num_topk,
            slots_per_token,
            torch.empty(rows * slots_per_token, dtype=torch.long, device=device),
        )

        def unpack() -> None:
            got = fmt.unpack(received.view(rows, -1)[:, : fmt.width])
            recv_ids = received.view(rows, -1)[:, fmt.width :].contiguous().view(torch.int32).view(rows, num_topk)
            # Messages in (source, token, k) order; a stable sort by expert keeps that order inside each expert.
            expert = torch.where(recv_ids >= 0, recv_ids, experts_per_rank).reshape(-1).long()
            order = torch.sort(expert, stable=True).indices
            sorted_expert = expert[order]
            count = torch.zeros(experts_per_rank + 1, dtype=torch.long, device=device)
            count.scatter_add_(0, expert, torch.ones_like(expert))
            start = count.cumsum(0) - count
            is_real = sorted_expert < experts_per_rank
            position = torch.arange(order.numel(), device=device) - start[sorted_expert]
            flat_row = torch.where(is_real, sorted_expert * rows + position, experts_per_rank * rows)
            message_row = order // num_topk  # (source, token) of each sorted message
            _scatter_rows(out, "recv_x", flat_row, got["x"].index_select(0, message_row))
            if "scales" in got:
                _scatter_rows(out, "recv_scales", flat_row, got["scales"].index_select(0, message_row))
            _scatter_rows(out, "src_info", flat_row, (message_row % tokens_cap).int())
            out["recv_count"].copy_(count[:experts_per_rank])
            source = message_row // tokens_cap
            per_source = torch.zeros(experts_per_rank + 1, num_ranks, dtype=torch.long, device=device)
            per_source.index_put_((sorted_expert, source), torch.ones_like(source), accumulate=True)
            per_source = per_source[:experts_per_rank]
            begin = per_source.cumsum(1) - per_source
            out["layout_range"].copy_((begin << 32) | per_source)
            # Combine slot of each message: (source, token, j) with j = rank of k among the token's k on us.
            j = _slot_in_rank(_rank_or_unique(recv_ids >= 0, torch.zeros_like(recv_ids))).reshape(-1)[order]
            slot = torch.where(is_real, message_row * slots_per_token + j, rows * slots_per_token)
            slot_rows = torch.full(
                (rows * slots_per_token + 1,), experts_per_rank * rows, dtype=torch.long, device=device
            )
            slot_rows.scatter_(0, slot, flat_row)
            route.slot_rows.copy_(slot_rows[:-1])

        return out, route, pending.then(unpack)

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        route: LowLatencyRoute,
        out: torch.Tensor,
    ) -> Pending:
        comm = self.comm
        num_experts_local, rows, hidden = x.shape
        tokens_cap = route.num_max_dispatch_tokens_per_rank
        slots = route.slots_per_token
        # [R*T*Kc, H]: rows back to their sources, in the (t, j) grid; empty slots (the trash index) get zeros.
        send = gather_rows(x.reshape(-1, hidden), route.slot_rows, trash=num_experts_local * rows)
        received = torch.empty_like(send)
        pending = comm.all_to_all(received, send, "low_latency_combine")
        num_tokens = topk_idx.shape[0]

        def reduce() -> None:
            valid = topk_idx >= 0
            dest = torch.where(valid, topk_idx // num_experts_local, 0)
            j = _slot_in_rank(_rank_or_unique(valid, dest))
            tokens = torch.arange(num_tokens, device=x.device)
            acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
            for k in range(topk_idx.shape[1]):
                slot = (dest[:, k] * tokens_cap + tokens) * slots + j[:, k].clamp(max=slots - 1)
                row = received.index_select(0, slot).float()
                product = topk_weights[:, k : k + 1].float() * row  # rounded product, then a separate add
                acc = acc + torch.where(valid[:, k : k + 1], product, torch.zeros_like(product))
            out.copy_(acc.to(out.dtype))

        return pending.then(reduce)


def _empty_ll_outputs(fields: dict, args: LowLatencyDispatchArgs, experts: int, rows: int, device) -> dict:
    """SPEC 6 receive tensors: [L, R*T, ...]; fp8 scales column-major ([L, S, R*T] transposed).

    Rows at or past recv_count are left uninitialised, as DeepEP leaves them: zeroing the whole [L, R*T, H]
    grid (hundreds of MB at DeepSeek sizes) would cost more than the exchange itself.

    Row-major outputs are the first L*R*T rows of a flat buffer with one more (trash) row, kept under
    "flat" so the scatter writes them in place; the column-major scales are scattered through a staging copy.
    """
    hidden = args.x.shape[1]
    flat: dict[str, torch.Tensor] = {}

    def with_trash(name: str, dtype: torch.dtype, *row_shape: int) -> torch.Tensor:
        flat[name] = torch.empty(experts * rows + 1, *row_shape, dtype=dtype, device=device)
        return flat[name][:-1].view(experts, rows, *row_shape)

    out = {
        "recv_x": with_trash("recv_x", fields["x"].dtype, hidden),
        "recv_count": torch.zeros(experts, dtype=torch.int32, device=device),
        "src_info": with_trash("src_info", torch.int32),
        "layout_range": torch.zeros(experts, args.num_experts // experts, dtype=torch.int64, device=device),
        "flat": flat,
    }
    if "scales" in fields:
        scales = fields["scales"]
        if scales.dim() == 1:  # int8: one scale per row
            out["recv_scales"] = with_trash("recv_scales", scales.dtype)
        else:
            out["recv_scales"] = torch.empty(
                experts, scales.shape[1], rows, dtype=scales.dtype, device=device
            ).transpose(1, 2)
    return out


def _dense(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0 or t.stride(-1) == 1:
        return t
    return t.clone(memory_format=torch.contiguous_format)


_FLOAT8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, name)
)


def _scatter_rows(out: dict, name: str, flat_row: torch.Tensor, values: torch.Tensor) -> None:
    """out[name][l, p] = values[i] where flat_row[i] = l * rows + p; the trash index L * rows is dropped.

    Row-major outputs are written in place through their flat buffer; column-major scales go through a
    staging buffer. No host round trips either way.
    """
    target = out["flat"].get(name)
    staging = None
    if target is None:
        shape = out[name].shape
        target = staging = out[name].new_empty(shape[0] * shape[1] + 1, *shape[2:])
    if target.dtype in _FLOAT8_DTYPES:  # index_copy_ has no float8 kernel on the CPU; bytes move the same
        target.view(torch.uint8).index_copy_(0, flat_row, values.view(torch.uint8))
    else:
        target.index_copy_(0, flat_row, values)
    if staging is not None:
        out[name].copy_(staging[:-1].view(out[name].shape))
