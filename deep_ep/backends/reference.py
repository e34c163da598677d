"""The reference backend: SPEC semantics with plain torch.distributed collectives (gloo, NCCL, HCCL).

Normal mode is one count exchange (all-gather of the layout counts) per fresh dispatch, then the rows travel as
bytes: x in an all-to-all of its own, straight into recv_x, beside one of the small per-token fields packed into
a byte row; cached dispatch and combine move each tensor the same way. `_forward` is the transport of dispatch
and cached dispatch (a kernel backend overrides it to move the same bytes another way). It has no preallocated
communication buffers, so `num_nvl_bytes`/`num_rdma_bytes` only get recorded; large host tensors come from a
per-backend cache (`packing.HostBuffers`), since fresh host memory page-faults on first touch.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.distributed as dist

from ..comm import Pending, host_sync_allowed
from ..errors import UnsupportedFeatureError
from ..kernels import host_ordered_sum
from ..kernels.ordered_sum import ordered_gather_sum
from ..packing import HostBuffers, RowFormat, byte_rows
from ..routing import Empty, Route, _torch_empty, channel_of_tokens, gather_rows, running_count, token_indices
from .base import Backend, DispatchArgs
from .reference_low_latency import LowLatencyMixin


class ReferenceBackend(LowLatencyMixin, Backend):
    name = "reference"
    device_types = ("cpu", "cuda", "npu", "xpu")
    priority = 0
    features = frozenset({"normal", "low_latency", "fp8", "int8", "any_group_size"})
    # SPEC 5's dtypes plus float64 (accumulated in float64), which float64 gradcheck of deep_ep.autograd needs.
    combine_dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

    @classmethod
    def unavailable_reason(cls, group: dist.ProcessGroup, device: torch.device) -> str | None:
        return None  # runs wherever torch.distributed does

    @classmethod
    def native_low_latency_quant(cls) -> str:
        return "fp8"

    # ---- SPEC section 3 ------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> tuple:
        num_tokens = topk_idx.shape[0]
        num_ranks = self.comm.size
        experts_per_rank = num_experts // num_ranks
        # The façade checked every id to lie in [-1, E): -1 (no expert) becomes E, whose rank is R, and counts into
        # an extra column that is dropped (no host round trip, no mask).
        expert_of = topk_idx.long().remainder(num_experts + 1)
        rank_of = expert_of // experts_per_rank
        hits = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.int32, device=topk_idx.device)
        hits.scatter_(1, rank_of, 1)
        is_token_in_rank = hits[:, :num_ranks].bool()
        num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
        num_tokens_per_rdma_rank = None
        if num_ranks > 8:
            num_nodes = -(-num_ranks // 8)
            node_hits = torch.zeros(num_tokens, num_nodes * 8, dtype=torch.bool, device=topk_idx.device)
            node_hits[:, :num_ranks] = is_token_in_rank
            num_tokens_per_rdma_rank = node_hits.view(num_tokens, num_nodes, 8).any(2).sum(0, dtype=torch.int32)
        expert_of = expert_of.reshape(-1)
        per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_idx.device)
        per_expert.scatter_add_(0, expert_of, torch.ones_like(expert_of, dtype=torch.int32))
        return num_tokens_per_rank, num_tokens_per_rdma_rank, per_expert[:num_experts], is_token_in_rank

    # ---- SPEC section 4 ------------------------------------------------------------------------------
    def dispatch(self, args: DispatchArgs) -> tuple[dict, Route, Pending]:
        comm, rank, num_ranks = self.comm, self.comm.rank, self.comm.size
        in_rank = args.is_token_in_rank
        num_tokens = in_rank.shape[0]
        num_experts = args.num_tokens_per_expert.numel()
        experts_per_rank = num_experts // num_ranks
        device = args.x.device
        if not (args.num_worst_tokens or host_sync_allowed(device)):
            raise UnsupportedFeatureError(
                "dispatch under CUDA-graph capture needs num_worst_tokens > 0: otherwise the receive size is read "
                "on the host (as in DeepEP)"
            )

        # Count exchange: tokens per destination, per (destination, channel), per expert; one all-gather.
        channel = channel_of_tokens(num_tokens, args.num_channels, device)
        width = num_ranks * (1 + args.num_channels) + num_experts
        host = None
        if host_sync_allowed(device):
            # The host read DeepEP makes; every count is read on the host: what derives from them (DeepEP's
            # prefix matrices) is computed there and sent to the device in one copy.
            host = comm.all_gather_host(self._count_row(args, channel), "dispatch")
            rows = host.tolist()
            args.raise_on_bad_input(_bad_input_flags(rows, num_ranks, width, num_experts), rank)
            host = host[:, :width]
            matrices = _host_prefix_matrices(rows, rank, args.num_channels, device)
        else:  # CUDA-graph capture: nothing may be read on the host (a padded route, see below)
            counts = torch.cat(_count_parts(args, channel))
            matrices = _prefix_matrices(comm.all_gather(counts, "dispatch"), rank, args.num_channels)
        rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_counts, channel_base = matrices

        if args.num_worst_tokens:
            if host is not None:  # every rank sees every total, so all ranks raise together
                totals = host[:, :num_ranks].sum(0).tolist()
                if max(totals) > args.num_worst_tokens:
                    raise ValueError(
                        f"num_worst_tokens={args.num_worst_tokens} is smaller than the tokens received: "
                        f"{totals} per rank"
                    )
            running = running_count(in_rank)  # shared by send_head and the route
            send_head = _send_head(in_rank, running, channel, channel_base)
            route = Route.padded_for(in_rank, recv_counts, args.num_worst_tokens, args.num_worst_tokens, running)
            count_list: list[int] = []
        else:
            # The receive sizes and the per-expert counts: known on the host since the count exchange.
            all_num_tokens = [row[width + 2] for row in rows]
            route, send_head = self._exact_route(
                in_rank, host[:, :num_ranks], rank_prefix_matrix, channel, channel_base, all_num_tokens
            )
            first = num_ranks * (1 + args.num_channels) + rank * experts_per_rank  # this rank's experts' counts
            received = [sum(column) for column in zip(*(row[first : first + experts_per_rank] for row in rows))]
            align = args.expert_alignment
            count_list = [(c + align - 1) // align * align for c in received]

        topk_idx = args.topk_idx
        src = token_indices(num_tokens, device)
        recv_x = self._empty((route.num_recv, *args.x.shape[1:]), args.x.dtype, device)
        # x travels apart, straight into recv_x (no pass to pack it or to unpack it); the small per-token
        # fields travel packed in one byte row.
        fields = dict(scales=args.x_scales, topk_idx=topk_idx, topk_weights=args.topk_weights, src=src)
        fmt = RowFormat.of(**fields)
        if fmt.width % 8:  # whole 8-byte words per row, so the row gathers move words, not bytes
            fields["pad"] = _zero_bytes(num_tokens, -fmt.width % 8, device)
            fmt = RowFormat.of(**fields)
        x_fmt = RowFormat.of(x=args.x)
        transfers = [(x_fmt.pack(x=args.x), byte_rows(recv_x, x_fmt.width)), (fmt.pack(**fields), None)]
        (_, received), pending = self._forward(route, transfers, "dispatch")

        out = {
            "recv_x": recv_x,
            "recv_x_scales": None
            if args.x_scales is None
            else self._empty((route.num_recv, *args.x_scales.shape[1:]), args.x_scales.dtype, device),
            "recv_topk_idx": None if topk_idx is None else topk_idx.new_empty(route.num_recv, topk_idx.shape[1]),
            "recv_topk_weights": None
            if args.topk_weights is None
            else args.topk_weights.new_empty(route.num_recv, topk_idx.shape[1]),
            "num_recv_tokens_per_expert_list": count_list,
            "handle": (
                rank_prefix_matrix,
                channel_prefix_matrix,
                recv_channel_prefix_matrix,
                torch.empty(route.num_recv, dtype=torch.int32, device=device),
                in_rank,
                send_head,
            ),
        }

        return out, route, pending.then(lambda: self._unpack(fmt, received, out, route, experts_per_rank))

    def _count_row(self, args: DispatchArgs, channel: torch.Tensor) -> torch.Tensor:
        """int32 [R + R * C + E + 3] on the device: this rank's row of a fresh dispatch's count exchange, the counts
        (`_count_parts`) then the range of the expert ids (so the input checks need no round trip of their own)
        and the token count (a backend that copies token rows into peer-visible memory sizes it alike on every
        rank: Route.all_num_tokens)."""
        tokens = args.is_token_in_rank.new_full((1,), args.is_token_in_rank.shape[0], dtype=torch.int32)
        return torch.cat([*_count_parts(args, channel), args.expert_id_range(), tokens])

    def _exact_route(
        self,
        in_rank: torch.Tensor,
        counts: torch.Tensor,
        rank_prefix_matrix: torch.Tensor,
        channel: torch.Tensor,
        channel_base: torch.Tensor,
        all_num_tokens: list[int],
    ) -> tuple[Route, torch.Tensor]:
        """A fresh dispatch's exact route and DeepEP's send_head [N, R], from the mask and the exchanged counts
        (counts: host [R, R]; rank_prefix_matrix, channel_base: on the device; channel: each token's channel)."""
        running = running_count(in_rank)  # shared by send_head, the route and the cuda backend's plan
        send_head = _send_head(in_rank, running, channel, channel_base)
        return Route.exact(in_rank, counts, self.comm.rank, running, all_num_tokens), send_head

    def _unpack(self, fmt: RowFormat, received: torch.Tensor, out: dict, route: Route, experts_per_rank: int) -> None:
        """From a fresh dispatch's received packed rows (uint8 [num_recv, fmt.width]) into its outputs: one pass,
        then the small per-row fix-ups (topk ids made local, others -1 with weight +0.0; padding rows -1)."""
        fmt.unpack_into(received, scales=out["recv_x_scales"], src=out["handle"][3])
        real = _real_rows(route)
        if real is not None:
            out["handle"][3].masked_fill_(~real, -1)
        if out["recv_topk_idx"] is not None:
            first = self.comm.rank * experts_per_rank
            idx = fmt.field_view(received, "topk_idx")
            local = (idx >= first) & (idx < first + experts_per_rank)
            if real is not None:
                local &= real.unsqueeze(1)
            out["recv_topk_idx"].copy_(torch.where(local, idx - first, -1))
            weights = fmt.field_view(received, "topk_weights")
            out["recv_topk_weights"].copy_(torch.where(local, weights, 0.0))

    def cached_dispatch(
        self, x: torch.Tensor, x_scales: torch.Tensor | None, route: Route
    ) -> tuple[torch.Tensor, torch.Tensor | None, Pending]:
        recv_x = self._empty((route.num_recv, *x.shape[1:]), x.dtype, x.device)
        # Each tensor travels on its own, received straight into the output's bytes: no unpacking pass.
        x_fmt = RowFormat.of(x=x)
        transfers = [(x_fmt.pack(x=x), byte_rows(recv_x, x_fmt.width))]
        recv_scales = None
        if x_scales is not None:
            recv_scales = self._empty((route.num_recv, *x_scales.shape[1:]), x_scales.dtype, x.device)
            s_fmt = RowFormat.of(scales=x_scales)
            transfers.append((s_fmt.pack(scales=x_scales), byte_rows(recv_scales, s_fmt.width)))
        _, pending = self._forward(route, transfers, "cached dispatch")
        return recv_x, recv_scales, pending

    def _forward(
        self, route: Route, transfers: list[tuple[torch.Tensor, torch.Tensor | None]], op: str
    ) -> tuple[list[torch.Tensor], Pending]:
        """Move token rows to their destinations, one transfer per (rows [N, W] uint8, out [num_recv, W] or
        None). Returns each transfer's received rows (in its `out` if given), valid once the Pending ran."""
        received, pending = [], None
        for rows, out in transfers:
            got, moved = route.forward(self.comm, rows, op, out=out, empty=self._empty)
            received.append(got)
            pending = moved if pending is None else pending.then(moved.wait)
        return received, pending

    def _empty(self, size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """torch.empty, through this backend's host cache (`HostBuffers`: fresh host memory page-faults)."""
        return self.__dict__.setdefault("_host_buffers", HostBuffers()).empty(size, dtype, device)

    # ---- SPEC section 5 ------------------------------------------------------------------------------
    def combine(
        self,
        x: torch.Tensor,
        route: Route,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor | None, Pending]:
        num_tokens = route.num_tokens
        # x and the weights return in separate all-to-alls (no packing pass), each with a zero row appended
        # for the tokens that sent nothing to some rank; on the first and last rank the rows a rank returns to
        # itself do not travel at all (read from x in the sum).
        own = route.own_block(self.comm)
        x_fmt = RowFormat.of(x=x)
        returned, pending = route.backward(self.comm, x_fmt.pack(x=x), "combine", True, self._empty, keep_own=True)
        combined_x = self._empty((num_tokens, *x.shape[1:]), x.dtype, x.device)
        combined_weights = None
        if topk_weights is not None:
            w_fmt = RowFormat.of(topk_weights=topk_weights)
            w_rows = w_fmt.pack(topk_weights=topk_weights)
            returned_w, w_pending = route.backward(self.comm, w_rows, "combine", True, self._empty, keep_own=True)
            pending.then(w_pending.wait)
            combined_weights = topk_weights.new_empty(num_tokens, topk_weights.shape[1])

        def own_rows(rows: torch.Tensor) -> tuple[int, torch.Tensor] | None:
            return None if own is None else (self.comm.rank, rows)

        def reduce() -> None:
            rows = x_fmt.field_view(returned, "x")
            _sum_returned(route, rows, bias, combined_x, self._empty, own_rows(x))
            if combined_weights is not None:
                rows = w_fmt.field_view(returned_w, "topk_weights")
                _sum_returned(route, rows, (), combined_weights, self._empty, own_rows(topk_weights))

        return combined_x, combined_weights, pending.then(reduce)


def _count_parts(args: DispatchArgs, channel: torch.Tensor) -> list[torch.Tensor]:
    """int32 on the device: tokens per destination [R] (as given), per (destination, channel) [R * C] (from the
    mask; `channel`: each token's), per expert [E] (as given)."""
    in_rank, num_channels = args.is_token_in_rank, args.num_channels
    per_channel = torch.zeros(in_rank.shape[1], num_channels, dtype=torch.int32, device=in_rank.device)
    per_channel.index_add_(1, channel, in_rank.t().int())
    return [args.num_tokens_per_rank.int(), per_channel.view(-1), args.num_tokens_per_expert.int()]


def _bad_input_flags(rows: list[list[int]], num_ranks: int, width: int, num_experts: int) -> list[tuple[bool, bool]]:
    """Per rank, from its exchanged row: (an expert id outside [-1, E), num_tokens_per_rank differs from what
    is_token_in_rank sends, i.e. from the sum of its per-channel counts)."""
    flags = []
    for row in rows:
        per_rank, per_channel = row[:num_ranks], row[num_ranks : width - num_experts]
        channels = len(per_channel) // num_ranks
        sent = [sum(per_channel[d * channels : (d + 1) * channels]) for d in range(num_ranks)]
        low, high = row[width], row[width + 1]
        flags.append((low < -1 or high >= num_experts, sent != per_rank))
    return flags


def _prefix_matrices(gathered: torch.Tensor, rank: int, num_channels: int) -> list[torch.Tensor]:
    """From the exchanged counts [R, R + R * C + E] (on their device): DeepEP's rank_prefix_matrix [R, R],
    channel_prefix_matrix [R, C] (this rank's sends) and recv_channel_prefix_matrix [R, C]; the rows received
    from each source [R]; `_send_head`'s channel_base [C, R]."""
    num_ranks = gathered.shape[0]
    counts = gathered[:, :num_ranks]  # [source, destination]
    per_channel = gathered[:, num_ranks : num_ranks * (1 + num_channels)].reshape(num_ranks, num_ranks, num_channels)
    rank_prefix_matrix = counts.cumsum(0, dtype=torch.int32)
    channel_prefix_matrix = per_channel[rank].cumsum(1, dtype=torch.int32)  # [destination, channel]
    channel_counts = per_channel[:, rank]  # [source, channel]
    # DeepEP's meaning: where each source's channel starts within that source's block of received rows.
    recv_channel_prefix_matrix = (channel_counts.cumsum(1, dtype=torch.int32) - channel_counts).int()
    channel_base = (channel_prefix_matrix - per_channel[rank] + 1).t()  # [channel, destination], for `_send_head`
    return [rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, counts[:, rank].int(), channel_base]


def _host_prefix_matrices(rows: list[list[int]], rank: int, num_channels: int, device: torch.device) -> list:
    """`_prefix_matrices` of the exchanged counts read on the host (rows: [R][R + R * C + ...] ints), in Python
    ints (a few hundred: cheaper than a dozen tiny torch operations), sent to `device` in one copy as int32 views
    of one tensor."""
    num_ranks, width = len(rows), num_channels
    counts = [row[:num_ranks] for row in rows]  # [source][destination]
    per_channel = [[row[num_ranks + d * width : num_ranks + (d + 1) * width] for d in range(num_ranks)] for row in rows]
    rank_prefix = list(itertools.accumulate(counts, lambda done, row: [a + b for a, b in zip(done, row)]))
    channel_prefix = [list(itertools.accumulate(sent)) for sent in per_channel[rank]]  # [destination][channel]
    recv_prefix = []  # each source's channel starts within its block of received rows (DeepEP's meaning)
    for source in range(num_ranks):
        got = per_channel[source][rank]
        recv_prefix.append([done - n for done, n in zip(itertools.accumulate(got), got)])
    base = [[channel_prefix[d][c] - per_channel[rank][d][c] + 1 for d in range(num_ranks)] for c in range(width)]
    recv_counts = [counts[source][rank] for source in range(num_ranks)]
    shapes = [(num_ranks, num_ranks), (num_ranks, width), (num_ranks, width), (num_ranks,), (width, num_ranks)]
    parts = [rank_prefix, channel_prefix, recv_prefix, [recv_counts], base]
    values = [v for part in parts for row in part for v in row]
    if device.type == "cuda":  # from pinned memory: a copy the host need not wait for
        flat = torch.tensor(values, dtype=torch.int32, pin_memory=True).to(device, non_blocking=True)
    else:
        flat = torch.tensor(values, dtype=torch.int32).to(device)
    out, begin = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[begin : begin + size].view(shape))
        begin += size
    return out


@functools.lru_cache(maxsize=16)
def _zero_bytes(num_rows: int, width: int, device: torch.device) -> torch.Tensor:
    """uint8 zeros [num_rows, width]: a packed row's padding. Cached (only ever read), as `channel_of_tokens`."""
    return torch.zeros(num_rows, width, dtype=torch.uint8, device=device)


def _send_head(
    in_rank: torch.Tensor, running: torch.Tensor, channel: torch.Tensor, channel_base: torch.Tensor
) -> torch.Tensor:
    """int32 [N, R]: position of each token in its (channel, destination) stream, -1 if not sent. running:
    `running_count(in_rank)`; channel_base [C, R]: 1 + the tokens sent to d before channel c begins, so each
    channel's positions restart at 0."""
    return torch.where(in_rank, running - channel_base[channel], -1).int()


def _real_rows(route: Route) -> torch.Tensor | None:
    """bool [num_recv]: which output rows hold a token (padded routes only)."""
    if not route.padded:
        return None
    return route.recv_rows < sum(route.recv_splits)


def _ordered_sum(
    route: Route, rows: torch.Tensor, bias: tuple[torch.Tensor, ...], num_tokens: int, out: torch.Tensor
) -> None:
    """fp32 sum per token from +0.0: the biases, then returned rows by destination ascending (SPEC 5).

    rows: [sum(send_splits), H], aligned with `route.send_tokens`. float64 rows (beyond SPEC, for gradcheck) are
    summed in float64, in the same order. combine calls `_sum_returned` on rows that already end in a zero row.
    """
    assert num_tokens == route.num_tokens
    _sum_returned(route, torch.cat([rows, rows.new_zeros(1, *rows.shape[1:])]), bias, out)


def _sum_returned(
    route: Route,
    rows: torch.Tensor,
    bias: tuple[torch.Tensor, ...],
    out: torch.Tensor,
    empty: Empty | None = None,
    own: tuple[int, torch.Tensor] | None = None,
) -> None:
    """`_ordered_sum` of rows [sum(send_splits) + 1, H] whose last row is zeros, into out [N, H]. `own`:
    (rank d, the rows d received [num_recv, H]): destination d's block of `rows` was not written; d's rows to
    itself, received from itself, stand for it.

    On the host, when the tokens form few runs that each destination got whole or not at all (`token_runs`; 2
    ranks, top-8 of 256: about 9 runs of 512 tokens), each run adds contiguous slices of the blocks, nothing
    gathered. Otherwise an exact route takes the one-pass ordered gather-sum kernel (same additions, same order,
    same bits; on CUDA, and on bf16 host rows where the C kernel is built), reading d's rows where they are. Else
    the terms are the biases, then each destination's rows gathered into token order (the zero row standing in
    for a token that sent nothing there: adding +0.0 to a sum that started from +0.0 changes no bit).
    """
    empty = empty or _torch_empty
    num_tokens = route.num_tokens
    blocks = route.destination_blocks()
    if not route.padded and (rows.is_cuda or (host_ordered_sum.usable(rows) and not _few_runs(route))):
        index = route.row_index if own is None else route.row_index_own_received(own[0])
        ordered_gather_sum(rows[:-1], index, bias, out=out, own=own)
        return
    if own is not None:
        d, received = own
        begin = sum(route.recv_splits[:d])
        own = (d, received[begin : begin + route.recv_splits[d]])
    if own is not None and (route.padded or not _few_runs(route)):
        d, own_rows = own
        rows[blocks[d][0] : blocks[d][1]].copy_(own_rows)  # what the all-to-all would have copied
        own = None
    if not route.padded and _few_runs(route):
        sources = [rows[begin:end] for begin, end in blocks]
        if own is not None:
            sources[own[0]] = own[1]
        for begin, end, firsts in route.token_runs:
            terms = [(b[begin:end], None) for b in bias]
            for source, (block_begin, _), first in zip(sources, blocks, firsts):
                if first >= 0:  # absent destinations add +0.0: nothing (see _sum_in_order)
                    first -= block_begin
                    terms.append((source[first : first + end - begin], None))
            _sum_in_order(terms, out[begin:end], empty)
        return
    terms: list[tuple[torch.Tensor, torch.Tensor | None]] = [(b, None) for b in bias]
    for d, (begin, end) in enumerate(blocks):
        if not route.padded and end - begin == num_tokens:  # every token went to d: the block is in token order
            terms.append((rows[begin:end], None))
        else:
            terms.append((rows, route.token_rows[d]))
    _sum_in_order(terms, out, empty)


def _few_runs(route: Route) -> bool:
    """Whether the runs of `token_runs` are long enough (4 tokens on average, at most 64 of them) that adding
    slices run by run beats gathering every term (host tensors of exact routes only)."""
    if route.send_tokens.is_cuda:
        return False
    runs = len(route.token_runs)
    return runs <= 64 and runs * 4 <= max(route.num_tokens, 4)


_SIGNED = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _has_negative_zero(t: torch.Tensor) -> bool:
    """Whether the floating tensor t holds a -0.0: its bits (the sign bit alone) are the smallest integer of the
    signed type of the same width, so one integer min finds it."""
    signed = _SIGNED.get(t.element_size())
    if signed is None:
        return True  # no such view: assume one, so the caller keeps its `+ 0.0` pass
    ints = t.view(signed)
    return ints.numel() > 0 and ints.min().item() == torch.iinfo(signed).min


def _sum_in_order(terms: list[tuple[torch.Tensor, torch.Tensor | None]], out: torch.Tensor, empty: Empty) -> None:
    """out [N, H] = one rounding to out.dtype of the float32 sum (float64 for float64) that starts from +0.0 and
    adds the terms in order, every addition a separate rounding. A term (rows, index) is rows[index[t]] for token
    t (rows[t] without an index); rows are of out.dtype.

    The sum starts from the first term instead of +0.0 (on devices other than the host, only with one or two
    terms or a float32/float64 out) and is fixed up at the end: +0.0 + a == a for every finite a except -0.0, so
    the two orders differ at most in the sign of a zero, and the SPEC's order never ends in -0.0 (a sum from +0.0
    is -0.0 only if both addends are), so `+ 0.0` on every -0.0 of the result restores it. (Rounding to bf16/fp16
    maps zero to zero and nonzero to nonzero here: every partial sum of such values is a multiple of their
    smallest subnormal, so the fix-up may follow the rounding.) Two terms of a 16-bit type are one torch add: it
    widens both to float32, adds once and rounds once, exactly the two steps of the SPEC. More terms are summed
    into a float32 accumulator a cache-sized block of tokens at a time, gathered as they are needed; a 16-bit
    term added into it is widened exactly by the addition itself, which then rounds once to float32.
    """
    num_tokens, hidden = out.shape
    acc_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    on_host = out.device.type == "cpu"

    def gathered(term: tuple[torch.Tensor, torch.Tensor | None], begin: int, end: int, into: torch.Tensor):
        rows, index = term
        if index is None:
            return rows[begin:end]
        return gather_rows(rows, index[begin:end], out=into)

    if not terms:
        out.zero_()
        return
    if out.dtype == acc_dtype or len(terms) <= 2:
        first = gathered(terms[0], 0, num_tokens, empty(out.shape, out.dtype, out.device))
        if len(terms) == 1:
            out.copy_(first)
        else:
            torch.add(first, gathered(terms[1], 0, num_tokens, empty(out.shape, out.dtype, out.device)), out=out)
        scratch = empty(out.shape, out.dtype, out.device) if len(terms) > 2 else None
        for term in terms[2:]:
            out.add_(gathered(term, 0, num_tokens, scratch))
        # A lone copied term may still be a signalling NaN, which `+ 0.0` quiets as the SPEC's addition does.
        _restore_zero_signs(out, always=len(terms) == 1 or not on_host)
        return
    block = max(1, (1 << 21) // max(1, hidden * 4))  # tokens whose float32 rows fill about 2 MB (an L2)
    acc = empty((min(block, num_tokens), hidden), acc_dtype, out.device)
    narrow = empty(acc.shape, out.dtype, out.device)
    for begin in range(0, num_tokens, block):
        end = min(begin + block, num_tokens)
        size = end - begin
        first = gathered(terms[0], begin, end, narrow[:size])
        if on_host:
            acc[:size].copy_(first)  # a plain widening: about 2.5x faster here than adding it to +0.0
        else:
            torch.add(first, 0.0, out=acc[:size])  # from +0.0 itself: no fix-up, so no device sync to look for one
        for term in terms[1:]:
            acc[:size].add_(gathered(term, begin, end, narrow[:size]))
        out[begin:end].copy_(acc[:size])
    if on_host:
        _restore_zero_signs(out, always=False)


def _restore_zero_signs(out: torch.Tensor, always: bool) -> None:
    """`+ 0.0` over out, which turns -0.0 into +0.0 and changes nothing else; unless `always`, only where a
    -0.0 is found (on the host an integer min costs about a fifth of the pass; elsewhere it would sync)."""
    if always or _has_negative_zero(out):
        out.add_(0.0)
