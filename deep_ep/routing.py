"""Where each row goes in the reference algorithm: one `Route` per normal-mode dispatch.

A route sends rows token -> destination ranks (dispatch, cached dispatch) and back (combine). Two forms:
- exact: split sizes are known on the host (DeepEP synchronises with the host in a fresh dispatch);
- padded: every (source, destination) pair gets `capacity` slots, so nothing needs the host
  (`num_worst_tokens` mode, CUDA-graph friendly); a trash row/slot absorbs what is unused.
Either way the rows arriving from source s form block s in ascending s, tokens ascending: SPEC order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .comm import Comm, Pending

# (size, dtype, device) -> an uninitialised tensor: torch.empty, or a backend's caching allocator.
Empty = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def _torch_empty(size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(size, dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def channel_of_tokens(num_tokens: int, num_channels: int, device: torch.device) -> torch.Tensor:
    """int64 [N]: DeepEP's channel of each token (contiguous ranges of ceil(N / C) tokens). Cached: a model
    dispatches the same token count call after call; callers only read it."""
    return torch.arange(num_tokens, device=device) // tokens_per_channel(num_tokens, num_channels)


@functools.lru_cache(maxsize=16)
def token_indices(num_tokens: int, device: torch.device) -> torch.Tensor:
    """int32 [N]: 0..N-1, each token's index (the `src` field a dispatch sends along). Cached as
    `channel_of_tokens`: callers only read it."""
    return torch.arange(num_tokens, dtype=torch.int32, device=device)


def tokens_per_channel(num_tokens: int, num_channels: int) -> int:
    """The length of DeepEP's channels: ceil(N / C) tokens (at least 1)."""
    return max(-(-num_tokens // num_channels), 1)


def running_count(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """int64 [N, R]: for each (t, d), how many of tokens 0..t go to rank d. Scanned along the last dimension: a
    CUDA scan over the outer dimension of a narrow [N, R] tensor runs one thread per column (0.2 ms at N=4096)."""
    return is_token_in_rank.t().long().cumsum(1).t()


@dataclass
class Route:
    """How one dispatch moved rows; enough to repeat it (cached dispatch) and reverse it (combine).

    send_tokens: int64 [sum(send_splits)], the token of each sent row, grouped by destination
        (padded form: `num_tokens` marks an unused slot).
    send_splits / recv_splits: rows sent to / received from each rank.
    recv_rows: padded form only, int64 [num_recv]: the received slot of each output row
        (`sum(recv_splits)` marks a padding row).
    all_counts: exact form only, host [R][R]: tokens sent from rank s to rank d for every pair, so a
        backend that writes into its peers' memory can compute every offset without another exchange.
    is_token_in_rank: exact form only, the dispatch's bool [N, R] (a backend's placement derives from it).
    running_count: exact form only, `running_count(is_token_in_rank)` where the dispatch computed it already.
    all_num_tokens: exact form only, host [R]: every rank's token count, where the dispatch exchanged it.
    cache: what a backend derives from the route once and reuses for every call with its handle.
    """

    num_tokens: int
    num_recv: int
    send_tokens: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_rows: torch.Tensor | None = None
    all_counts: list[list[int]] | None = None
    is_token_in_rank: torch.Tensor | None = None
    running_count: torch.Tensor | None = None
    all_num_tokens: list[int] | None = None
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def padded(self) -> bool:
        return self.recv_rows is not None

    @staticmethod
    def exact(
        is_token_in_rank: torch.Tensor,
        counts: torch.Tensor,
        rank: int,
        running: torch.Tensor | None = None,
        all_num_tokens: list[int] | None = None,
        send_tokens: torch.Tensor | None = None,
    ) -> Route:
        """counts: host int [R, R] of tokens sent from rank s to rank d; running: `running_count` of the mask,
        if the caller has it; all_num_tokens: every rank's token count, if the caller exchanged them;
        send_tokens: the route's `send_tokens`, if the caller computed them."""
        send_splits = counts[rank].tolist()
        if send_tokens is None:
            # (d, t) pairs come sorted by d, then t; the host knows how many, so no second synchronisation.
            send_tokens = _nonzero_known(is_token_in_rank.t(), sum(send_splits))[:, 1]
        recv_splits = counts[:, rank].tolist()
        num_tokens, num_recv, all_counts = is_token_in_rank.shape[0], sum(recv_splits), counts.tolist()
        return Route(
            num_tokens,
            num_recv,
            send_tokens,
            send_splits,
            recv_splits,
            None,
            all_counts,
            is_token_in_rank,
            running,
            all_num_tokens,
        )

    @staticmethod
    def padded_for(
        is_token_in_rank: torch.Tensor,
        recv_counts: torch.Tensor,
        capacity: int,
        num_recv: int,
        running: torch.Tensor | None = None,
    ) -> Route:
        """A host-free route: recv_counts is a device int [R] (rows from each source), capacity >= each count;
        running: `running_count` of the mask, if the caller has it."""
        num_tokens, num_ranks = is_token_in_rank.shape
        device = is_token_in_rank.device
        # Slot of (t, d) = how many earlier tokens also go to d; unsent pairs and overflow go to a trash column.
        slot = (running_count(is_token_in_rank) if running is None else running) - 1
        slot = torch.where(is_token_in_rank & (slot < capacity), slot, capacity)
        send_tokens = torch.full((num_ranks, capacity + 1), num_tokens, dtype=torch.long, device=device)
        tokens = torch.arange(num_tokens, device=device).unsqueeze(1).expand(num_tokens, num_ranks)
        send_tokens.scatter_(1, slot.t(), tokens.t())
        send_tokens = send_tokens[:, :capacity].reshape(-1)
        # Output row p comes from source s = the block holding p, at slot p - start(s).
        ends = recv_counts.long().cumsum(0)
        rows = torch.arange(num_recv, device=device)
        source = torch.searchsorted(ends, rows, right=True)
        start = torch.cat([ends.new_zeros(1), ends])[source]
        recv_rows = source * capacity + (rows - start)
        recv_rows = torch.where(source < num_ranks, recv_rows, num_ranks * capacity)
        splits = [capacity] * num_ranks
        return Route(num_tokens, num_recv, send_tokens, splits, list(splits), recv_rows)

    def forward(
        self, comm: Comm, rows: torch.Tensor, op: str, out: torch.Tensor | None = None, empty: Empty | None = None
    ) -> tuple[torch.Tensor, Pending]:
        """Send token rows [N, W] to their destinations; returns the received rows [num_recv, W], valid once
        the Pending ran. `out`: an optional receive buffer (e.g. the byte view of the output tensor); `empty`:
        what allocates the send and receive buffers (torch.empty by default)."""
        empty = empty or _torch_empty
        width = rows.shape[1]
        if out is None:
            out = empty((self.num_recv, width), rows.dtype, rows.device)
        if not self.padded and comm.rank in (0, comm.size - 1):
            return out, self._forward_around_own_block(comm, rows, op, out, empty)
        send = empty((self.send_tokens.shape[0], width), rows.dtype, rows.device)
        gather_rows(rows, self.send_tokens, self.num_tokens if self.padded else None, out=send)
        if not self.padded:
            return out, comm.all_to_all(out, send, op, self.recv_splits, self.send_splits)
        received = empty((sum(self.recv_splits), width), rows.dtype, rows.device)
        pending = comm.all_to_all(received, send, op, self.recv_splits, self.send_splits)
        return out, pending.then(lambda: gather_rows(received, self.recv_rows, received.shape[0], out=out))

    def _forward_around_own_block(
        self, comm: Comm, rows: torch.Tensor, op: str, out: torch.Tensor, empty: Empty
    ) -> Pending:
        """forward() of an exact route on the first or last rank, whose own rows are the first or last block of
        both `send_tokens` and `out`: the other blocks travel, and while they do this rank gathers its own rows
        straight into `out` (one pass, where the all-to-all would gather them and then copy them), on few SMs so
        that NCCL's kernel need not wait for it."""
        rank = comm.rank
        own = self.send_splits[rank]
        sent = self.send_tokens[own:] if rank == 0 else self.send_tokens[: self.send_tokens.shape[0] - own]
        send = empty((sent.shape[0], rows.shape[1]), rows.dtype, rows.device)
        gather_rows(rows, sent, out=send)
        splits = [0 if d == rank else n for d, n in enumerate(self.send_splits)]
        recv_splits = [0 if s == rank else n for s, n in enumerate(self.recv_splits)]
        if rank == 0:
            own_tokens, own_rows, others = self.send_tokens[:own], out[:own], out[own:]
        else:
            begin = self.num_recv - own
            own_tokens, own_rows, others = self.send_tokens[sent.shape[0] :], out[begin:], out[:begin]
        pending = comm.all_to_all(others, send, op, recv_splits, splits) if comm.size > 1 else None
        from .kernels.row_gather import gather_rows_beside  # (the kernels import this module)

        gather_rows_beside(rows, own_tokens, own_rows)
        return pending or Pending(comm, op, [], [], on_host=rows.device.type == "cpu")

    def backward(
        self,
        comm: Comm,
        rows: torch.Tensor,
        op: str,
        zero_row: bool = False,
        empty: Empty | None = None,
        keep_own: bool = False,
    ) -> tuple[torch.Tensor, Pending]:
        """Send received rows [num_recv, W] back to their sources; returns rows aligned with `send_tokens`
        (`zero_row`: plus one zero row at the end, which `token_rows` points absent pairs at). `keep_own`: where
        `own_block` is not None, this rank's rows to itself do not travel and that block of the result is left
        unwritten (the caller reads them from `rows`)."""
        empty = empty or _torch_empty
        width = rows.shape[1]
        if self.padded:
            slots = empty((sum(self.recv_splits) + 1, width), rows.dtype, rows.device).zero_()
            source = _words(rows[: self.num_recv].contiguous())
            # The rows' words may be narrower than the fresh slots' (rows starting at an odd offset): match them.
            slots.view(source.dtype).index_copy_(0, self.recv_rows, source)
            rows = slots[:-1]
        else:
            rows = rows[: self.num_recv]
        total = sum(self.send_splits)
        returned = empty((total + int(zero_row), width), rows.dtype, rows.device)
        if zero_row:
            returned[total:].zero_()
        own = self.own_block(comm) if keep_own else None
        if own is None:
            pending = comm.all_to_all(returned[:total], rows.contiguous(), op, self.send_splits, self.recv_splits)
            return returned, pending
        begin, recv_begin, count = own
        rank = comm.rank
        if rank == 0:  # the own block is the first one of both, else the last one
            travel, into = rows[count:], returned[count:total]
        else:
            travel, into = rows[:recv_begin], returned[:begin]
        send_splits = [0 if d == rank else n for d, n in enumerate(self.send_splits)]
        recv_splits = [0 if d == rank else n for d, n in enumerate(self.recv_splits)]
        if comm.size == 1:
            return returned, Pending(comm, op, [], [], on_host=rows.device.type == "cpu")
        return returned, comm.all_to_all(into, travel.contiguous(), op, send_splits, recv_splits)

    def own_block(self, comm: Comm) -> tuple[int, int, int] | None:
        """(first row in `send_tokens` order, first received row, count) of this rank's rows to itself when they
        are the first or last block on both sides (exact routes, first and last rank), else None."""
        rank = comm.rank
        if self.padded or rank not in (0, comm.size - 1):
            return None
        count = self.send_splits[rank]
        return sum(self.send_splits[:rank]), sum(self.recv_splits[:rank]), count

    @cached_property
    def token_runs(self) -> list[tuple[int, int, list[int]]]:
        """Exact routes: the tokens as maximal runs [begin, end) in which every destination got either all of
        them, as consecutive rows of its block, or none; per run the row (in `send_tokens` order) of its first
        token at each destination, -1 where absent. Read on the host."""
        index = self.token_rows
        present = index < self.send_tokens.shape[0]
        breaks = ((present[:, 1:] != present[:, :-1]).any(0).nonzero()[:, 0] + 1).tolist()
        bounds = [0, *breaks, self.num_tokens]
        starts = torch.where(present, index, -1)[:, bounds[:-1]].t().tolist() if self.num_tokens else []
        return [(b, e, first) for b, e, first in zip(bounds[:-1], bounds[1:], starts) if e > b]

    @cached_property
    def row_index(self) -> torch.Tensor:
        """Exact routes: int32 [N, R], the row of `send_tokens` (which combine's returned rows follow) holding
        token t's row from rank d, -1 where it sent none: what the ordered gather-sum reads, built once."""
        from .kernels.ordered_sum import row_index_from_splits

        return row_index_from_splits(self.send_tokens, self.send_splits, self.num_tokens)

    def row_index_own_received(self, rank: int) -> torch.Tensor:
        """`row_index` with column `rank` pointing into the rows this rank received (combine's input, where the
        rows from itself start after those of lower sources) instead of the returned rows: for a sum that reads
        a rank's rows to itself where they are. Built once per rank."""
        key = ("row_index_own_received", rank)
        if key not in self.cache:
            shift = sum(self.recv_splits[:rank]) - sum(self.send_splits[:rank])
            index = self.row_index.clone()
            own = index[:, rank]
            own.add_(torch.where(own >= 0, shift, 0).int())
            self.cache[key] = index
        return self.cache[key]

    @cached_property
    def token_rows(self) -> torch.Tensor:
        """int64 [R, N]: the row of `send_tokens` that token t sent to rank d, or `len(send_tokens)` (the zero
        row `backward(..., zero_row=True)` appends) where it sent none. Built on the device, no host wait."""
        num_ranks, total = len(self.send_splits), self.send_tokens.shape[0]
        device = self.send_tokens.device
        index = torch.full((num_ranks, self.num_tokens + 1), total, dtype=torch.long, device=device)
        if total:
            # The splits are host ints; a non-blocking copy keeps the host from waiting on the stream.
            sizes = torch.tensor(self.send_splits, dtype=torch.long).to(device, non_blocking=True)
            rank = torch.repeat_interleave(torch.arange(num_ranks, device=device), sizes, output_size=total)
            # Each (d, t) pair occurs once; a padded route's unused slots all land in the dropped column N.
            index[rank, self.send_tokens] = torch.arange(total, device=device)
        return index[:, : self.num_tokens]

    def destination_blocks(self) -> list[tuple[int, int]]:
        """(begin, end) of the rows of each destination within `send_tokens`, ascending destination."""
        blocks, begin = [], 0
        for size in self.send_splits:
            blocks.append((begin, begin + size))
            begin += size
        return blocks


def _nonzero_known(mask: torch.Tensor, count: int) -> torch.Tensor:
    """mask.nonzero() when the number of true entries is already known on the host (no device round trip)."""
    if hasattr(torch, "nonzero_static") and mask.is_cuda:
        return torch.nonzero_static(mask, size=count)
    return mask.nonzero()


def _words(rows: torch.Tensor) -> torch.Tensor:
    """Byte rows [M, W] as the widest integer rows that fit: gathers move 8 bytes per element, not 1."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if rows.shape[1] % size == 0 and rows.stride(0) % size == 0 and rows.storage_offset() % size == 0:
            if rows.stride(1) == 1 or rows.shape[1] <= 1:
                return rows.view(dtype)
    return rows


def gather_rows(
    rows: torch.Tensor, index: torch.Tensor, trash: int | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """rows[index] with index_select (far faster than advanced indexing on byte rows); entries equal to
    `trash` give zero rows. Writes into `out` when given."""
    if rows.shape[0] == 0:  # only trash entries can point here
        result = rows.new_zeros(index.shape[0], rows.shape[1])
        return result if out is None else out.copy_(result)
    clamped = index if trash is None else index.clamp(max=rows.shape[0] - 1)
    words = _words(rows)
    if out is None:
        out = words.index_select(0, clamped).view(rows.dtype)
    else:
        out_words = _words(out)
        if out_words.dtype == words.dtype:
            torch.index_select(words, 0, clamped, out=out_words)
        else:
            out.copy_(words.index_select(0, clamped).view(rows.dtype))
    if trash is not None:  # on whole words: a byte-wise masked fill is as slow as the byte-wise gather was
        _words(out).masked_fill_((index == trash).unsqueeze(1), 0)
    return out
