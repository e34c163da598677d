"""Low-latency mode of the reference backend (SPEC section 6).

Dispatch sends every token once to each rank that holds one of its experts, in a [R, T] grid of slots
(slot t = token t), with the token's local expert ids for that rank attached; the receiver expands the
messages into per-expert rows in SPEC order (source, token, k). Combine sends each expert row back to its
token's rank, which weights and sums them in k order.

Two forms, same bits. Off the CPU every size depends only on T, H, K, L and R, so both calls are free of host
round trips and CUDA-graph capturable: the receiver scatters the messages into the grid with `index_copy_`, and
combine sends a [R, T, min(K, L)] grid of rows whatever the routing. On the CPU a host read costs no more than
the op that produced the value, so the work follows the messages instead of the grid: the receiver gathers each
expert's rows with one `index_select` (the CPU `index_copy_` moves one element at a time), combine sends one
row per message (both sides know the split sizes from the dispatch), and receive grids are reused once nothing
holds them any more (a fresh grid is above glibc's mmap threshold, so every page written would fault).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import quant
from ..comm import Pending
from ..packing import RowFormat
from ..routing import Empty, _words, gather_rows
from .base import LowLatencyDispatchArgs


@dataclass
class LowLatencyRoute:
    """What combine needs from dispatch: for each combine slot (s, t, j), the output row that fills it."""

    num_max_dispatch_tokens_per_rank: int
    num_topk: int
    slots_per_token: int  # Kc = min(K, L): a token meets at most that many distinct experts on one rank
    slot_rows: torch.Tensor  # int64 [R*T*Kc]: flat row of [L*R*T] (L*R*T = none)
    # CPU form only (None elsewhere), about this rank's own tokens: the rows each rank returns in combine (its
    # selections there, in (t, k) order) and where the row of (t, k) lands among them (their total: none).
    recv_splits: list[int] | None = None
    token_slot: torch.Tensor | None = None  # int64 [N, K]


def _rank_or_unique(valid: torch.Tensor, dest_rank: torch.Tensor) -> torch.Tensor:
    """dest_rank where valid, else a distinct negative value per k, so invalid entries match nothing."""
    unique = -1 - torch.arange(valid.shape[-1], device=valid.device)
    return torch.where(valid, dest_rank.long(), unique)


def _slot_in_rank(dest_rank: torch.Tensor) -> torch.Tensor:
    """int64 [..., K]: for each k, how many earlier k' of the same token go to the same rank."""
    same = dest_rank.unsqueeze(-1) == dest_rank.unsqueeze(-2)  # [..., K(k), K(k')]
    earlier = torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril(-1)
    return (same & earlier).sum(-1)


def _sizes_follow_values(device: torch.device) -> bool:
    """Whether a low-latency call may size its transfers from tensor values: a host read, free on the CPU only
    (module docstring). Tests turn it off to run the fixed-size exchange of the GPUs on the CPU."""
    return device.type == "cpu"


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
        exact = _sizes_follow_values(device)

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
        send = self._empty((num_ranks, tokens_cap, fmt.width + 4 * num_topk), torch.uint8, device)
        send[:, :num_tokens, : fmt.width] = payload.unsqueeze(0)
        send[:, :num_tokens, fmt.width :] = _dense(ids).view(torch.uint8).view(num_ranks, num_tokens, 4 * num_topk)
        if num_tokens < tokens_cap:
            send[:, num_tokens:, : fmt.width] = 0  # no uninitialised bytes leave the process
            send[:, num_tokens:, fmt.width :] = 255  # int32 -1 in every id byte: empty slots select nothing
        received = self._empty(send.shape, torch.uint8, device)
        pending = comm.all_to_all(received.view(-1), send.view(-1), "low_latency_dispatch")

        rows = num_ranks * tokens_cap
        out = _ll_outputs(self._empty, fields, args, experts_per_rank, rows, device)
        slots_per_token = min(num_topk, experts_per_rank)
        route = LowLatencyRoute(
            tokens_cap,
            num_topk,
            slots_per_token,
            torch.empty(rows * slots_per_token, dtype=torch.long, device=device),
        )
        if exact:
            # Combine returns this rank's selections grouped by rank, (t, k) ascending within a rank.
            flat_dest = torch.where(valid, dest, num_ranks).reshape(-1)
            per_rank = torch.zeros(num_ranks + 1, dtype=torch.long, device=device)
            per_rank.scatter_add_(0, flat_dest, torch.ones_like(flat_dest))
            route.recv_splits = per_rank[:num_ranks].tolist()
            order = torch.sort(flat_dest, stable=True).indices
            slot = torch.empty_like(order)
            slot[order] = torch.arange(order.numel(), device=device)
            route.token_slot = torch.where(valid, slot.view(num_tokens, num_topk), sum(route.recv_splits))

        def unpack() -> None:
            recv = received.view(rows, -1)
            # A fresh copy: the ids start fmt.width bytes into each row, where an int32 view may not start.
            ids = recv[:, fmt.width :].clone(memory_format=torch.contiguous_format)
            recv_ids = (
                ids.view(torch.int32).view(rows, num_topk) if num_topk else ids.new_empty((rows, 0), dtype=torch.int32)
            )
            # Messages in (source, token, k) order; a stable sort by expert keeps that order inside each expert.
            expert = torch.where(recv_ids >= 0, recv_ids, experts_per_rank).reshape(-1).long()
            sorted_expert, order = torch.sort(expert, stable=True)
            count = torch.zeros(experts_per_rank + 1, dtype=torch.long, device=device)
            count.scatter_add_(0, expert, torch.ones_like(expert))
            start = count.cumsum(0) - count
            is_real = sorted_expert < experts_per_rank
            position = torch.arange(order.numel(), device=device) - start[sorted_expert]
            flat_row = torch.where(is_real, sorted_expert * rows + position, experts_per_rank * rows)
            message_row = order // num_topk  # (source, token) of each sorted message
            x_bytes = recv[:, : fmt.fields[0].nbytes]
            if exact:
                # One gather per expert, straight into its rows; the real messages sort first, the rest is dropped.
                counts = count[:experts_per_rank].tolist()
                num_messages = sum(counts)
                flat_row, message_row = flat_row[:num_messages], message_row[:num_messages]
                sorted_expert, is_real = sorted_expert[:num_messages], is_real[:num_messages]
                # Expert e's rows: [e * rows, e * rows + c_e) of the flat grid; one split makes all the views.
                sizes = [n for c in counts for n in (c, rows - c)]
                grid = out["recv_x"].view(torch.uint8).view(experts_per_rank * rows, -1)
                targets = torch.split(grid, sizes)[::2]
                for target, index in zip(targets, torch.split(message_row, counts)):
                    if index.numel():
                        torch.index_select(x_bytes, 0, index, out=target)
            else:  # a scatter of whole words (index_copy_ has no float8 kernel on the CPU anyway)
                gathered = x_bytes.index_select(0, message_row)
                _words(out["flat"]["recv_x"].view(torch.uint8)).index_copy_(0, flat_row, _words(gathered))
            if "scales" in fields:
                values = fmt.field_view(recv, "scales").index_select(0, message_row)
                _put(out["flat"]["recv_scales"], flat_row, values, rows, experts_per_rank)
            _put(out["flat"]["src_info"], flat_row, (message_row % tokens_cap).int(), rows, experts_per_rank)
            out["recv_count"].copy_(count[:experts_per_rank])
            source = message_row // tokens_cap
            # A scatter-add of ones (an accumulating index_put_ sorts its indices first on CUDA: 0.2 ms at T=256).
            per_source = torch.zeros((experts_per_rank + 1) * num_ranks, dtype=torch.long, device=device)
            per_source.scatter_add_(0, sorted_expert * num_ranks + source, torch.ones_like(source))
            per_source = per_source.view(experts_per_rank + 1, num_ranks)[:experts_per_rank]
            begin = per_source.cumsum(1) - per_source
            out["layout_range"].copy_((begin << 32) | per_source)
            # Combine slot of each message: (source, token, j) with j = rank of k among the token's k on us.
            j = _slot_in_rank(_rank_or_unique(recv_ids >= 0, torch.zeros_like(recv_ids))).reshape(-1)[order]
            j = j[: message_row.numel()]
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
        none = num_experts_local * rows  # the "no row" entry of slot_rows
        flat_x = x.reshape(-1, hidden)
        valid = topk_idx >= 0
        if route.token_slot is not None:
            # One row per message each way: what each source sent us, in its (t, k) order.
            used = route.slot_rows < none
            index = route.slot_rows[used]
            send = gather_rows(flat_x, index, out=self._empty((index.shape[0], hidden), x.dtype, x.device))
            send_splits = used.view(comm.size, -1).sum(1).tolist()
            total = sum(route.recv_splits)
            received = self._empty((total + 1, hidden), x.dtype, x.device)
            pending = comm.all_to_all(received[:total], send, "low_latency_combine", route.recv_splits, send_splits)
            slot = route.token_slot
        else:
            # [R*T*Kc, H]: rows back to their sources, in the (t, j) grid; empty slots (the none entry) get zeros.
            total = route.slot_rows.shape[0]
            send = gather_rows(flat_x, route.slot_rows, none, out=self._empty((total, hidden), x.dtype, x.device))
            received = self._empty((total + 1, hidden), x.dtype, x.device)
            pending = comm.all_to_all(received[:total], send, "low_latency_combine")
            dest = torch.where(valid, topk_idx // num_experts_local, 0)
            j = _slot_in_rank(_rank_or_unique(valid, dest))
            tokens = torch.arange(topk_idx.shape[0], device=x.device).unsqueeze(1)
            slot = torch.where(valid, (dest * tokens_cap + tokens) * slots + j.clamp(max=slots - 1), total)
        received[total:].zero_()  # the row that invalid (t, k) read
        return pending.then(lambda: _weighted_sum(received, slot, valid, topk_weights, out, self._empty))


def _weighted_sum(
    received: torch.Tensor,
    slot: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    empty: Empty,
) -> None:
    """SPEC 6.3: out[t] = bf16 of the fp32 sum from +0.0 over k of fp32(w[t, k]) * fp32(received[slot[t, k]]),
    each product rounded before its addition; invalid k read the zero row with weight +0.0 (adds +0.0: no bit
    changes, as the running sum is never -0.0)."""
    num_tokens, num_topk = slot.shape
    if num_tokens == 0:
        return
    if num_topk == 0:
        out.zero_()
        return
    hidden = received.shape[1]
    weights = torch.where(valid, weights, torch.zeros_like(weights)).unsqueeze(-1)
    # On the CPU a block of tokens whose float32 products fill about 2 MB (an L2), so they are summed from cache;
    # on a GPU each block costs a dozen kernel launches, so blocks are as large as 64 MB of products allow.
    budget = 1 << 21 if out.device.type == "cpu" else 1 << 26
    block = min(num_tokens, max(1, budget // (num_topk * hidden * 4)))
    rows = empty((block * num_topk, hidden), received.dtype, out.device)
    products = empty((block, num_topk, hidden), torch.float32, out.device)
    acc = empty((block, hidden), torch.float32, out.device)
    for begin in range(0, num_tokens, block):
        end = min(begin + block, num_tokens)
        size = end - begin
        gather_rows(received, slot[begin:end].reshape(-1), out=rows[: size * num_topk])
        part = products[:size]
        part.copy_(rows[: size * num_topk].view(size, num_topk, hidden))
        part.mul_(weights[begin:end])
        total = torch.add(part[:, 0], 0.0, out=acc[:size])  # == +0.0 + the first product
        for k in range(1, num_topk):
            total.add_(part[:, k])
        out[begin:end].copy_(total)


def _ll_outputs(empty: Empty, fields: dict, args: LowLatencyDispatchArgs, experts: int, rows: int, device) -> dict:
    """SPEC 6 receive tensors: [L, R*T, ...]; fp8 scales column-major ([L, S, R*T] transposed).

    Rows at or past recv_count are left uninitialised (on the CPU: as the previous user left them), as DeepEP
    leaves them: zeroing the whole [L, R*T, H] grid (hundreds of MB at DeepSeek sizes) would cost more than the
    exchange itself. Each grid is a view of a flat buffer with one more (trash) element per row element, kept
    under "flat", where `_put` and `index_copy_` send what belongs nowhere.
    """
    hidden = args.x.shape[1]
    x = fields["x"]
    flat = {"recv_x": empty((experts * rows + 1, hidden), x.dtype, device)}
    out = {
        "recv_x": flat["recv_x"][:-1].view(experts, rows, hidden),
        "recv_count": torch.zeros(experts, dtype=torch.int32, device=device),
        "layout_range": torch.zeros(experts, args.num_experts // experts, dtype=torch.int64, device=device),
        "flat": flat,
    }
    flat["src_info"] = torch.empty(experts * rows + 1, dtype=torch.int32, device=device)
    out["src_info"] = flat["src_info"][:-1].view(experts, rows)
    if "scales" in fields:
        scales = fields["scales"]
        per_row = 1 if scales.dim() == 1 else scales.shape[1]  # int8: one scale per row, row-major
        flat["recv_scales"] = empty((experts * rows * per_row + per_row,), scales.dtype, device)
        grid = flat["recv_scales"][: experts * rows * per_row]
        if scales.dim() == 1:
            out["recv_scales"] = grid.view(experts, rows)
        else:
            out["recv_scales"] = grid.view(experts, per_row, rows).transpose(1, 2)
    return out


def _put(flat: torch.Tensor, flat_row: torch.Tensor, values: torch.Tensor, rows: int, experts: int) -> None:
    """Write per-message values [M] or [M, S] into a grid [L, R*T] or column-major [L, R*T, S] held flat with
    S trash elements at the end: message i goes to row flat_row[i] = l * rows + p (l = experts: the trash)."""
    target = flat.view(torch.uint8).view(torch.int8) if flat.dtype in _FLOAT8_DTYPES else flat
    source = values.reshape(-1)
    if target is not flat:
        source = source.view(torch.uint8).view(torch.int8)
    if values.dim() == 1:  # one value per row: the flat row is the index (and L * rows the trash element)
        target.index_copy_(0, flat_row, source)
        return
    per_row = values.shape[1]
    expert, position = flat_row // rows, flat_row % rows
    column = torch.arange(per_row, device=flat.device)
    index = (expert * rows * per_row + position).unsqueeze(1) + column * rows  # [M, S]: l*S*rows + s*rows + p
    index = torch.where((expert < experts).unsqueeze(1), index, experts * rows * per_row + column)
    target.index_copy_(0, index.reshape(-1), source)


def _dense(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0 or t.stride(-1) == 1:
        return t
    return t.clone(memory_format=torch.contiguous_format)


_FLOAT8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, name)
)
