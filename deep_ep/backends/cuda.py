"""The CUDA backend: normal-mode dispatch and combine as direct writes into peer GPU memory over NVLink.

docs/CUDA.md has the design, the memory-ordering argument and the results. In short:
- Peer memory is torch symmetric memory (deep_ep/backends/peer_memory.py): one workspace per Buffer, equal in
  size on every rank and mapped into every peer. NVLink multicast stays off.
- Dispatch reuses the reference algorithm for everything but the transport: one launch of `push_rows_kernel`
  reads each token row once and stores it into every destination's workspace at its SPEC row (sources
  ascending, tokens ascending), the packed small per-token fields riding along; then one device barrier, and
  each rank copies its rows out. The same bytes land in the same rows as in the reference backend:
  bit-identical by construction. The algorithm's bookkeeping (the count row, the route, the unpack) runs in three
  small kernels (`deep_ep.kernels.triton_fresh_dispatch`) instead of the reference's torch operations, since the
  host paces a fresh dispatch.
- A cached dispatch pulls instead: each rank copies its token rows into its own workspace, one barrier, and
  `pull_rows_kernel` reads each received row straight from its source's workspace into the output (the handle's
  recv_src_idx says which row), so nothing is copied out afterwards.
- Combine pushes each row received from a peer back into that peer's workspace (x, and the weights; a rank's rows
  from itself stay where they are), one barrier, and the source sums in SPEC order with the ordered-sum kernel
  (`deep_ep.kernels.ordered_sum`), reading each row once, its own rows from the combine's input. The rows going
  back to one peer are one contiguous block on both sides, so where the layouts match they go as one copy per peer
  on the GPU's copy engines instead of the push kernel (`COPY_ENGINES_ENV`; measured faster on 2 GPUs).
- Alternate calls use alternate halves of the workspace, so one barrier per call suffices: a rank writes into
  a half again only after a barrier that every peer reached after reading that half.
- The push kernel runs on `Config.num_sms` SMs (a persistent grid). The copy-out is one torch copy (a memcpy where
  rows are whole 16-byte words); the combine's sum is one kernel over the whole GPU.
- `num_worst_tokens`, one-rank groups and tensors on another GPU run the reference algorithm over the same NCCL
  group (identical results by definition; logged once each). Low-latency mode has its own kernels
  (cuda_low_latency.py).

No C++ or CUDA C++ is involved: the kernels are Triton. Nothing here imports Triton or symmetric memory at
module level, so `import deep_ep` keeps working on a CPU-only install.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..comm import Comm, Pending, group_device_types
from ..kernels import on_device
from ..kernels.ordered_sum import ordered_gather_sum
from ..packing import RowFormat, byte_rows
from ..routing import Route, running_count, tokens_per_channel
from .base import DispatchArgs, LowLatencyDispatchArgs
from .cuda_low_latency import CudaLowLatencyRoute, LowLatencyKernels, kernel_refusal
from .peer_memory import WORD, SymmetricWorkspace, word_deltas
from .reference import ReferenceBackend

log = logging.getLogger("deep_ep.cuda")


@functools.cache
def _normal_kernels() -> Any:
    """deep_ep.kernels.triton_normal, imported at first use (it imports Triton) and then at no cost per call."""
    from ..kernels import triton_normal

    return triton_normal


@functools.cache
def _fresh_dispatch_kernels() -> Any:
    """deep_ep.kernels.triton_fresh_dispatch, imported at first use (it imports Triton)."""
    from ..kernels import triton_fresh_dispatch

    return triton_fresh_dispatch


ROW_ALIGN = 16  # bytes: workspace rows start 16-byte aligned, so the kernel stores 16-byte vectors
# Whether a combine sends its blocks with the copy engines (one cudaMemcpy per peer) instead of the push kernel:
# "auto" (the default) on 2-rank groups, where a copy moved 335-362 GB/s against the kernel's 240-274 (2xH200,
# docs/results/2026-11-23-session24/tma_probe.py); "1" on any group; "0" never.
COPY_ENGINES_ENV = "DEEP_EP_CUDA_COPY_ENGINES"


# ---- the plan: which rows go where (pure host arithmetic, tested on the CPU) ----------------------------
@dataclass(frozen=True)
class PushCopy:
    """One contiguous block written into a peer's workspace region.

    dispatch: rows `send_tokens[src_begin : src_begin + count]` of the token rows;
    combine: rows `[src_begin, src_begin + count)` of the rows being returned.
    They land at rows `[dst_row, dst_row + count)` of `peer`'s region.
    """

    peer: int
    src_begin: int
    count: int
    dst_row: int


def dispatch_plan(counts: list[list[int]], rank: int) -> list[PushCopy]:
    """The blocks rank `rank` writes in a dispatch, ascending peer; counts[s][d] = tokens rank s sends to d.

    Rank d receives the rows of source s at rows [sum_{s'<s} counts[s'][d], +counts[s][d]) (SPEC 4 order);
    the rows for d sit in `send_tokens` after those of lower destinations.
    """
    copies, begin = [], 0
    for dest in range(len(counts)):
        count = counts[rank][dest]
        if count:
            copies.append(PushCopy(dest, begin, count, sum(counts[s][dest] for s in range(rank))))
        begin += count
    return copies


def combine_plan(counts: list[list[int]], rank: int) -> list[PushCopy]:
    """The blocks rank `rank` writes in a combine, ascending peer: each source's received rows go home.

    Rank `rank` holds source s's rows at [sum_{s'<s} counts[s'][rank], +counts[s][rank]); source s keeps
    them where its dispatch sent them, after the rows of lower destinations: row sum_{d<rank} counts[s][d].
    """
    copies, begin = [], 0
    for source in range(len(counts)):
        count = counts[source][rank]
        if count:
            copies.append(PushCopy(source, begin, count, sum(counts[source][:rank])))
        begin += count
    return copies


def copy_engines_wanted(num_ranks: int) -> bool:
    """Whether a combine sends its blocks with the copy engines (`COPY_ENGINES_ENV`: auto, 0 or 1)."""
    value = os.environ.get(COPY_ENGINES_ENV, "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{COPY_ENGINES_ENV}={value!r}: expected auto, 0 or 1")
    return value == "1" or (value == "auto" and num_ranks == 2)


def copy_blocks(workspace: Any, region: int, rows: torch.Tensor, blocks: list[PushCopy]) -> None:
    """Each block of byte rows [N, W] (contiguous, W a whole workspace row) into its peer's region that starts at
    byte `region`: the same layout on both sides, so each block is one copy, which the GPU's copy engines run."""
    width = rows.shape[1]
    for block in blocks:
        peer = workspace.peer(block.peer)
        offset = peer.storage_offset() + region + block.dst_row * width
        target = peer.as_strided((block.count, width), (width, 1), offset)
        target.copy_(rows[block.src_begin : block.src_begin + block.count])


def rows_received(counts: list[list[int]], rank: int, dispatch: bool) -> int:
    """Rows that land in `rank`'s region: a dispatch's receive size, or a combine's send size."""
    return sum(row[rank] for row in counts) if dispatch else sum(counts[rank])


def workspace_rows(counts: list[list[int]], dispatch: bool) -> int:
    """The largest `rows_received` over all ranks: every rank computes the same value from the same counts."""
    return max((rows_received(counts, r, dispatch) for r in range(len(counts))), default=0)


def align_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


@dataclass(frozen=True)
class PushPlan:
    """One direction of a route as the push kernel takes it (built once per handle and direction).

    dest: int32 [num_rows, R], contiguous, the row that row i takes in rank d's region, or -1 (rows: the tokens for a
    dispatch, the received rows for a combine); capacity: the largest region's rows on any rank (the same on
    every rank); received: the rows of this rank's region that the call fills; order: int32, the rows the kernel
    takes, in the order it takes them, or None for every row, ascending.
    """

    dest: torch.Tensor
    capacity: int
    received: int
    order: torch.Tensor | None = None


def dispatch_push_plan(
    counts: list[list[int]], rank: int, is_token_in_rank: torch.Tensor, running: torch.Tensor | None = None
) -> PushPlan:
    """The `PushPlan` of a dispatch: token t goes to row (rows of lower sources at d) + (earlier tokens of this
    rank sent to d) of rank d's region, per `dispatch_plan`; a running count over the tokens gives the second
    term (`running`, the dispatch's own `running_count` of the mask where it has one), so the plan costs a few
    operations on the device the mask lives on."""
    num_ranks = len(counts)
    first_row = [0] * num_ranks
    for copy in dispatch_plan(counts, rank):
        first_row[copy.peer] = copy.dst_row
    device = is_token_in_rank.device
    offset = torch.tensor(first_row, dtype=torch.long).sub_(1).to(device, non_blocking=True)
    if running is None:
        running = running_count(is_token_in_rank)
    # Row-major whatever the mask's strides: the kernel reads dest[i, d] at i * R + d.
    dest = torch.where(is_token_in_rank, running + offset, -1).int().contiguous()
    return PushPlan(dest, workspace_rows(counts, True), rows_received(counts, rank, True))


def combine_push_plan(counts: list[list[int]], rank: int, device: torch.device) -> PushPlan:
    """The `PushPlan` of a combine: the rows received from each source go back to it, placed per `combine_plan`;
    the rows a rank received from itself stay where they are (the sum reads them from the combine's input), so
    its own block of the region is left unwritten and its rows are not in `order`.

    Its rows are grouped by destination; its order takes the others round-robin over the destinations (the
    first row of each block, then the second, ...), so the kernel's programs, on every rank, write to all
    destinations at once instead of all ranks to one GPU at a time."""
    num_ranks = len(counts)
    num_rows = rows_received(counts, rank, True)
    splits, shifts = [0] * num_ranks, [0] * num_ranks
    for copy in combine_plan(counts, rank):
        splits[copy.peer], shifts[copy.peer] = copy.count, copy.dst_row - copy.src_begin
    own_begin, own_count = sum(splits[:rank]), splits[rank]
    splits[rank] = 0
    pushed = num_rows - own_count
    dest = torch.full((num_rows, num_ranks), -1, dtype=torch.int32, device=device)
    order = torch.zeros(0, dtype=torch.int32, device=device)
    if pushed:
        # The blocks come in ascending peer order, so entry e of peer p lands at e + shifts[p]; entries after
        # the own block are `own_count` further on.
        splits_shifts = torch.tensor([splits, shifts], dtype=torch.long).to(device, non_blocking=True)
        peer = torch.repeat_interleave(torch.arange(num_ranks, device=device), splits_shifts[0], output_size=pushed)
        entry = torch.arange(pushed, device=device)
        entry += (entry >= own_begin).long() * own_count
        dest[entry, peer] = (entry + splits_shifts[1][peer]).int()
        order = entry[round_robin_order(splits_shifts[0], peer).long()].int()
    return PushPlan(dest, workspace_rows(counts, False), rows_received(counts, rank, False), order)


def round_robin_order(splits: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """int32: the rows of consecutive blocks (sizes `splits`; `block[i]`: the block of row i) taken round-robin,
    the first row of each block, then the second, ...: a kernel's programs then work on every block at once."""
    entry = torch.arange(block.shape[0], device=block.device)
    block_start = torch.cumsum(splits, 0) - splits
    return torch.argsort((entry - block_start[block]) * splits.shape[0] + block).int()


@dataclass(frozen=True)
class PullPlan:
    """A cached dispatch as the pull kernel takes it (built once per handle), every tensor in processing order.

    out_row: int32 [received], the received rows round-robin over the sources (the first row of each source's
    block, then the second, ...), so every rank reads from every peer at once (taken in ascending order, all
    ranks would read source 0 first: measured 1.0 ms instead of 0.53 at 4096 x 7168 on 4xH200); peer / row:
    int32, the rank whose workspace holds that row's source row, and its index there (the source's token index,
    the handle's recv_src_idx); capacity: the most tokens any rank has, the rows of the region each rank copies
    its tokens into (the same on every rank).
    """

    out_row: torch.Tensor
    peer: torch.Tensor
    row: torch.Tensor
    capacity: int


def pull_plan(recv_splits: list[int], recv_src_idx: torch.Tensor, all_num_tokens: list[int]) -> PullPlan:
    """The `PullPlan` of a route: received rows come in source blocks (`recv_splits`, ascending source), row j of
    source s's block being s's token `recv_src_idx[j]`."""
    device, received = recv_src_idx.device, recv_src_idx.shape[0]
    splits = torch.tensor(recv_splits, dtype=torch.long).to(device, non_blocking=True)
    peer = torch.repeat_interleave(torch.arange(len(recv_splits), device=device), splits, output_size=received)
    order = round_robin_order(splits, peer)
    return PullPlan(order, peer[order].int(), recv_src_idx[order].int(), max(all_num_tokens, default=0))


# ---- byte-row helpers --------------------------------------------------------------------------------------
def pad_columns(rows: torch.Tensor, pitch: int) -> torch.Tensor:
    """uint8 [N, pitch]: `rows` [N, W] with zero bytes appended, starting 16-byte aligned (no copy when W == pitch,
    contiguous and aligned already)."""
    if rows.shape[1] == pitch and rows.is_contiguous() and rows.data_ptr() % 16 == 0:
        return rows
    out = rows.new_zeros(rows.shape[0], pitch)
    out[:, : rows.shape[1]] = rows
    return out


def source_words(rows: torch.Tensor, pitch: int) -> tuple[torch.Tensor, bool]:
    """Byte rows [N, W] as the int32 words [N, ceil(W / 4)] the push kernel reads (a view where the layout
    allows, else a copy padded to `pitch` bytes), and whether every row starts 16-byte aligned."""
    if rows.numel() == 0:  # nothing to read; an empty view may still sit at an offset no int32 view takes
        return rows.new_empty(rows.shape[0], -(-rows.shape[1] // WORD), dtype=torch.int32), True
    whole = rows.shape[1] % WORD == 0 and rows.stride(1) == 1 and rows.stride(0) % WORD == 0
    if not (whole and rows.data_ptr() % WORD == 0):
        rows = pad_columns(rows, pitch)
    words = rows.view(torch.int32)
    return words, words.stride(0) % 4 == 0 and words.data_ptr() % 16 == 0


def workspace_rows_view(workspace: Any, offset: int, num_rows: int, pitch: int, width: int) -> torch.Tensor:
    """uint8 [num_rows, width]: rows of `pitch` bytes from byte `offset` of this rank's workspace (one view op,
    not a slice, a reshape and a slice: this is on every call's host path)."""
    local = workspace.local
    return local.as_strided((num_rows, width), (pitch, 1), local.storage_offset() + offset)


def output_words(rows: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """Byte rows [M, W] (an output) as the int32 words the pull kernel writes, and whether every row starts
    16-byte aligned; None where they cannot be viewed so (W not a multiple of 4 bytes, or strided)."""
    if rows.shape[1] % WORD or rows.stride(1) != 1 or rows.stride(0) % WORD or rows.data_ptr() % WORD:
        return None
    if rows.numel() == 0:  # nothing to write (and an empty view's offset may refuse the int32 view)
        return rows.new_empty(rows.shape[0], rows.shape[1] // WORD, dtype=torch.int32), True
    words = rows.view(torch.int32)
    return words, words.stride(0) % 4 == 0 and words.data_ptr() % 16 == 0


def _pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): a Triton block's extent."""
    return 1 << max(n - 1, 0).bit_length()


def _field_words(fmt: RowFormat, rows: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, list[int]] | None:
    """Packed byte rows [M, fmt.width] as int32 words, and the word offset of each named field; None where a
    field does not start on a word or the rows cannot be viewed as words."""
    offsets = [fmt.offset(name) for name in names]
    if any(offset % WORD for offset in offsets) or rows.shape[1] % WORD or rows.stride(1) != 1:
        return None
    if rows.stride(0) % WORD or rows.storage_offset() % WORD:
        return None
    return rows.view(torch.int32), [offset // WORD for offset in offsets]


@dataclass(frozen=True)
class _Push:
    """One tensor of a push (or a pull): its rows (the source's, or the output's) as int32 words, whether they
    start 16-byte aligned, and the word offset and pitch (words) of its region in every rank's workspace."""

    src: torch.Tensor
    aligned: bool
    region: int
    pitch: int


def _companion_arguments(main: _Push, companion: _Push | None, aligned: str) -> tuple[_Push, dict]:
    """A push or pull launch's companion record and constexprs (WORDS2, BLOCK2, the alignment flag `aligned`);
    without a companion, a stand-in the kernel never touches and no constexprs (WORDS2 defaults to 0)."""
    if companion is None:
        return _Push(main.src, False, 0, ROW_ALIGN // WORD), {}
    width = companion.src.shape[1]
    return companion, {"WORDS2": width, "BLOCK2": max(16, _pow2(width)), aligned: companion.aligned}


# ---- the backend -------------------------------------------------------------------------------------------
class CudaBackend(ReferenceBackend):
    """NVLink peer-memory transport and Triton kernels; the reference algorithm for what they do not serve."""

    name = "cuda"
    device_types = ("cuda",)
    priority = 10
    features = frozenset({"normal", "low_latency", "fp8", "int8", "any_group_size"})

    def __init__(self, comm: Comm, device: torch.device, low_latency_quant: str) -> None:
        super().__init__(comm, device, low_latency_quant)
        self._workspace: Any = None
        self._deltas: tuple[tuple[int, int], torch.Tensor] | None = None  # ((pointer, size), word deltas)
        self._calls = 0  # normal-mode pushes so far: its parity picks the workspace half (equal on every rank)
        self._last_stream: torch.cuda.Stream | None = None
        self._logged: set[str] = set()
        self._low_latency = LowLatencyKernels(self)
        self._copy_engines = copy_engines_wanted(comm.size)

    @classmethod
    def unavailable_reason(cls, group: dist.ProcessGroup, device: torch.device) -> str | None:
        try:
            if device.type != "cuda":
                return f"tensors live on {device.type!r}, not a CUDA GPU"
            if not torch.cuda.is_available():
                return f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
            if "cuda" not in group_device_types(group):
                return f"the group's backend is {dist.get_backend(group)!r}; the cuda backend needs an NCCL group"
            if importlib.util.find_spec("triton") is None:
                return "Triton is not installed (the combine reduction is a Triton kernel)"
            try:
                import torch.distributed._symmetric_memory as symm_mem
            except Exception as error:  # an ImportError, or a build without distributed CUDA pieces
                return f"torch symmetric memory cannot be imported ({error})"
            if not (hasattr(symm_mem, "empty") and hasattr(symm_mem, "rendezvous")):
                return f"torch {torch.__version__} has no symm_mem.empty/rendezvous"
            index = device.index if device.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            if major < 8:
                return f"GPU {index} has compute capability {major}.{minor}; the cuda backend needs 8.0 or newer"
            world, count = dist.get_world_size(group), torch.cuda.device_count()
            if world > count:
                return (
                    f"the group has {world} ranks but this process sees {count} GPU(s): the cuda backend needs "
                    "every rank on one host, one GPU each, all visible to every rank"
                )
            for other in range(count):
                if other != index and not torch.cuda.can_device_access_peer(index, other):
                    return f"GPU {index} cannot access GPU {other} peer-to-peer (no NVLink/P2P path)"
        except Exception as error:  # a broken probe must not break "auto"
            return f"the CUDA availability check failed: {error!r}"
        return None

    def _log_once(self, reason: str, level: int = logging.WARNING) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.log(level, "deep_ep cuda: %s", reason)

    # ---- what runs the reference algorithm -------------------------------------------------------------
    def _refusal(self, route: Route, tensor: torch.Tensor) -> str | None:
        """Why this call moves its rows with the reference algorithm (NCCL) instead of peer writes, or None."""
        if self.comm.size == 1:
            return "a one-rank group runs the reference algorithm (nothing crosses GPUs)"
        if route.padded:
            return "num_worst_tokens > 0 runs the reference algorithm over NCCL (peer-write path not written yet)"
        if route.all_counts is None:
            return "a route without its count matrix runs the reference algorithm"
        if tensor.device != self.device:
            return f"tensors on {tensor.device} (the Buffer's GPU is {self.device}) run the reference algorithm"
        return None

    def _low_latency_refusal(self, tensor: torch.Tensor, hidden: int, use_fp8: bool) -> str | None:
        """Why this low-latency call runs the reference algorithm instead of the kernels, or None."""
        if self.comm.size == 1:
            return "a one-rank group runs the reference algorithm (nothing crosses GPUs)"
        if tensor.device != self.device:
            return f"tensors on {tensor.device} (the Buffer's GPU is {self.device}) run the reference algorithm"
        return kernel_refusal(hidden, use_fp8, self.low_latency_quant)

    def low_latency_dispatch(self, args: LowLatencyDispatchArgs) -> tuple[dict, Any, Pending]:
        reason = self._low_latency_refusal(args.x, args.x.shape[1], args.use_fp8)
        if reason is not None:
            self._log_once(reason, logging.INFO if self.comm.size == 1 else logging.WARNING)
            return super().low_latency_dispatch(args)
        return self._low_latency.dispatch(args)

    def low_latency_combine(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, route: Any, out: torch.Tensor
    ) -> Pending:
        if not isinstance(route, CudaLowLatencyRoute):  # its dispatch ran the reference algorithm
            return super().low_latency_combine(x, topk_idx, topk_weights, route, out)
        return self._low_latency.combine(x, topk_idx, topk_weights, route, out)

    # ---- transport: dispatch and cached dispatch -------------------------------------------------------
    def dispatch(self, args: DispatchArgs) -> tuple[dict, Route, Pending]:
        out, route, pending = super().dispatch(args)
        if route.all_num_tokens is not None:
            # Which token of its source each received row is: what a cached dispatch pulls by (filled in by
            # `pending` on this stream, before any later call with the handle reads it).
            route.cache["recv_src_idx"] = out["handle"][3]
        return out, route, pending

    def _count_row(self, args: DispatchArgs, channel: torch.Tensor) -> torch.Tensor:
        """The reference's count-exchange row, from one kernel."""
        in_rank = args.is_token_in_rank
        if self.comm.size == 1 or in_rank.device != self.device:
            return super()._count_row(args, channel)
        num_tokens, num_ranks = in_rank.shape
        num_experts = args.num_tokens_per_expert.numel()
        # -1: where the id range's two slots start (the kernel's programs merge their ranges into them)
        row = torch.full(
            (num_ranks * (1 + args.num_channels) + num_experts + 3,), -1, dtype=torch.int32, device=self.device
        )
        topk_idx = args.topk_idx
        num_topk = 0 if topk_idx is None else topk_idx.shape[1]
        with on_device(self.device):
            _fresh_dispatch_kernels().count_kernel[(args.num_channels,)](
                in_rank.view(torch.uint8),
                args.num_tokens_per_rank,
                args.num_tokens_per_expert,
                row if topk_idx is None else topk_idx,
                row,
                num_tokens,
                in_rank.stride(0),
                in_rank.stride(1),
                args.num_tokens_per_rank.stride(0),
                num_experts,
                args.num_tokens_per_expert.stride(0),
                *((1, 1) if topk_idx is None else topk_idx.stride()),
                tokens_per_channel(num_tokens, args.num_channels),
                args.num_channels,
                R=num_ranks,
                R_POW2=_pow2(num_ranks),
                K=num_topk,
                K_POW2=_pow2(num_topk),
                BLOCK=256,
            )
        return row

    def _exact_route(
        self,
        in_rank: torch.Tensor,
        counts: torch.Tensor,
        rank_prefix_matrix: torch.Tensor,
        channel: torch.Tensor,
        channel_base: torch.Tensor,
        all_num_tokens: list[int],
    ) -> tuple[Route, torch.Tensor]:
        """The reference's route, send_head and (kept with the route) the push plan, from one kernel."""
        num_tokens, num_ranks = in_rank.shape
        if self.comm.size == 1 or in_rank.device != self.device or num_tokens == 0:
            return super()._exact_route(in_rank, counts, rank_prefix_matrix, channel, channel_base, all_num_tokens)
        rank, device = self.comm.rank, in_rank.device
        send_tokens = torch.empty(sum(counts[rank].tolist()), dtype=torch.long, device=device)
        route = Route.exact(in_rank, counts, rank, None, all_num_tokens, send_tokens)
        send_head = torch.empty(num_tokens, num_ranks, dtype=torch.int32, device=device)
        dest = torch.empty_like(send_head)
        with on_device(self.device):
            _fresh_dispatch_kernels().route_kernel[(num_ranks,)](
                in_rank.view(torch.uint8),
                rank_prefix_matrix,
                channel_base,
                send_head,
                dest,
                send_tokens,
                num_tokens,
                in_rank.stride(0),
                in_rank.stride(1),
                tokens_per_channel(num_tokens, channel_base.shape[0]),
                rank,
                R=num_ranks,
                R_POW2=_pow2(num_ranks),
                BLOCK=1024,
            )
        counts_list = route.all_counts
        plan = PushPlan(dest, workspace_rows(counts_list, True), rows_received(counts_list, rank, True))
        route.cache["cuda_dispatch_plan"] = plan
        return route, send_head

    def _unpack(self, fmt: RowFormat, received: torch.Tensor, out: dict, route: Route, experts_per_rank: int) -> None:
        """The reference's unpack in one kernel where the packed fields are whole int32 words (else the reference's
        torch operations)."""
        topk_idx = out["recv_topk_idx"]
        usable = topk_idx is not None and topk_idx.shape[1] > 0 and received.shape[0] > 0
        words = _field_words(fmt, received, ("topk_idx", "topk_weights", "src")) if usable else None
        if words is None or route.padded or received.device != self.device:
            super()._unpack(fmt, received, out, route, experts_per_rank)
            return
        if out["recv_x_scales"] is not None:
            fmt.unpack_into(received, scales=out["recv_x_scales"])
        rows, num_topk = topk_idx.shape
        row_words, offsets = words
        with on_device(self.device):
            _fresh_dispatch_kernels().unpack_kernel[(-(-rows // 64),)](
                row_words,
                topk_idx,
                out["recv_topk_weights"].view(torch.int32),
                out["handle"][3],
                rows,
                row_words.stride(0),
                *offsets,
                self.comm.rank * experts_per_rank,
                experts_per_rank,
                K=num_topk,
                K_POW2=_pow2(num_topk),
                IDX64=topk_idx.dtype == torch.int64,
                ROWS=64,
            )

    def _forward(
        self, route: Route, transfers: list[tuple[torch.Tensor, torch.Tensor | None]], op: str
    ) -> tuple[list[torch.Tensor], Pending]:
        reason = self._refusal(route, transfers[0][0])
        if reason is not None:
            self._log_once(reason, logging.INFO if self.comm.size == 1 else logging.WARNING)
            return super()._forward(route, transfers, op)
        outputs = [None if out is None else output_words(out) for _, out in transfers]
        if op == "cached dispatch" and "recv_src_idx" in route.cache and None not in outputs:
            self._pull(route, self._pull_plan(route), [rows for rows, _ in transfers], outputs)
            return [out for _, out in transfers], Pending(self.comm, op, [], [], on_host=False)
        received = self._push(self._plan(route, dispatch=True), [rows for rows, _ in transfers])
        # Copies out of the workspace run on this stream, before the next call's barrier (see _push). On the CPU
        # (the emulation) a caller may read rows left in the workspace later (async_finish defers the unpacking
        # to the event), after the call after next reused that half: they are copied out there.
        results = [
            out.copy_(got) if out is not None else got.clone() if got.device.type == "cpu" else got
            for got, (_, out) in zip(received, transfers)
        ]
        return results, Pending(self.comm, op, [], [], on_host=False)

    # ---- combine ---------------------------------------------------------------------------------------
    def combine(
        self,
        x: torch.Tensor,
        route: Route,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor | None, Pending]:
        reason = self._refusal(route, x)
        if reason is not None:
            self._log_once(reason, logging.INFO if self.comm.size == 1 else logging.WARNING)
            return super().combine(x, route, topk_weights, bias)
        tensors = [byte_rows(t, t.shape[1] * t.element_size()) for t in (x, topk_weights) if t is not None]
        returned = self._push(self._plan(route, dispatch=False), tensors, self._combine_blocks(route, tensors))
        # Rows came back where `send_tokens` lists them (destination blocks ascending, tokens ascending), except
        # this rank's rows to itself, which the sum reads from the combine's input.
        rank = self.comm.rank
        row_index = route.row_index_own_received(rank)
        combined_x = ordered_gather_sum(returned[0].view(x.dtype), row_index, bias, own=(rank, x))
        combined_weights = None
        if topk_weights is not None:
            rows = returned[1].view(topk_weights.dtype)
            combined_weights = ordered_gather_sum(rows, row_index, own=(rank, topk_weights))
        return combined_x, combined_weights, Pending(self.comm, "combine", [], [], on_host=False)

    def _combine_blocks(self, route: Route, tensors: list[torch.Tensor]) -> list[PushCopy] | None:
        """The combine's blocks for the copy engines, the peers in turn from the next rank on (so that at each step
        every rank copies to a different peer); None where the push kernel sends the rows: copy engines off, or
        rows that are not workspace rows byte for byte (contiguous, a whole number of ROW_ALIGN units)."""
        if not self._copy_engines or any(
            not t.shape[1] or t.shape[1] % ROW_ALIGN or not t.is_contiguous() for t in tensors
        ):
            return None
        blocks = route.cache.get("cuda_combine_blocks")
        if blocks is None:
            rank, size = self.comm.rank, self.comm.size
            others = [block for block in combine_plan(route.all_counts, rank) if block.peer != rank]
            blocks = sorted(others, key=lambda block: (block.peer - rank) % size)
            route.cache["cuda_combine_blocks"] = blocks
        return blocks

    # ---- the push ----------------------------------------------------------------------------------------
    def _plan(self, route: Route, dispatch: bool) -> PushPlan:
        """The route's `PushPlan` for one direction, built on first use and kept with the route (its handle)."""
        key = "cuda_dispatch_plan" if dispatch else "cuda_combine_plan"
        plan = route.cache.get(key)
        if plan is None:
            if dispatch:
                plan = dispatch_push_plan(route.all_counts, self.comm.rank, route.is_token_in_rank, route.running_count)
            else:
                plan = combine_push_plan(route.all_counts, self.comm.rank, self.device)
            route.cache[key] = plan
        return plan

    @contextlib.contextmanager
    def _call(self, half: int) -> Iterator[tuple[Any, int]]:
        """One normal-mode call on the workspace: on the Buffer's device, the workspace at least `2 * half` bytes
        (collective: every rank asks for the same size), ordered after the previous call's stream. Yields the
        workspace and the byte offset of this call's half."""
        on_gpu = self.device.type == "cuda"
        with on_device(self.device):  # the kernels launch on the current device: make it the Buffer's
            if self._workspace is None:
                self._workspace = self._new_workspace()
            workspace = self._workspace
            workspace.ensure(max(2 * half, 1))  # allocated even when no rank sends a row: the views need memory
            # Alternate halves: this call's writes into a half p (a peer's, or our own that peers read) come after
            # our barrier of the previous call, which every peer reached only after its reads (on its stream) of
            # what the call before left in p.
            region = workspace.nbytes // 2 * (self._calls % 2)
            self._calls += 1
            current = torch.cuda.current_stream() if on_gpu else None
            if self._last_stream is not None and self._last_stream != current:
                # The previous call read this workspace on another stream: order that before our barrier.
                current.wait_stream(self._last_stream)
            yield workspace, region
            self._last_stream = current

    def _push(
        self, plan: PushPlan, tensors: list[torch.Tensor], blocks: list[PushCopy] | None = None
    ) -> list[torch.Tensor]:
        """Write the byte rows [num_rows, W] of each tensor into the ranks' workspaces per `plan` (one region per
        tensor), then one barrier. Returns this rank's received rows of each, [plan.received, W] views of its
        workspace, valid on the current stream until its call after next starts. `blocks` (the same rows as
        contiguous blocks, see `copy_blocks`): copied with the copy engines instead of the push kernel."""
        pitches = [max(align_up(rows.shape[1], ROW_ALIGN), ROW_ALIGN) for rows in tensors]
        # Same counts and row widths on every rank, so every rank asks for the same size.
        with self._call(plan.capacity * sum(pitches)) as (workspace, region):
            words, deltas = workspace.local.view(torch.int32), self._word_deltas(workspace)
            received, pushes = [], []
            for rows, pitch in zip(tensors, pitches):
                if blocks is not None:
                    copy_blocks(workspace, region, rows, blocks)
                else:
                    src, aligned = source_words(rows, pitch)
                    if rows.shape[0] and src.shape[1]:
                        pushes.append(_Push(src, aligned, region // WORD, pitch // WORD))
                received.append(workspace_rows_view(workspace, region, plan.received, pitch, rows.shape[1]))
                region += plan.capacity * pitch
            if len(pushes) == 2 and pushes[1].src.shape[1] <= _normal_kernels().COMPANION_MAX_WORDS:
                self._launch(plan, words, deltas, pushes[0], pushes[1])  # one launch: the narrow one rides along
            else:
                for push in pushes:
                    self._launch(plan, words, deltas, push)
            # Every peer's rows for this rank have landed once every rank has passed this point.
            workspace.barrier(self.comm.timeout_s)
        return received

    def _pull_plan(self, route: Route) -> PullPlan:
        plan = route.cache.get("cuda_pull_plan")
        if plan is None:
            plan = pull_plan(route.recv_splits, route.cache["recv_src_idx"], route.all_num_tokens)
            route.cache["cuda_pull_plan"] = plan
        return plan

    def _pull_sources(self, route: Route, plan: PullPlan, deltas: torch.Tensor) -> torch.Tensor:
        """int64, per processing position: the words from `ws` to the source rank's workspace (kept with the
        route for the current mapping; a regrown workspace maps elsewhere)."""
        kept = route.cache.get("cuda_pull_sources")
        if kept is None or kept[0] is not deltas:
            kept = (deltas, deltas[plan.peer.long()])
            route.cache["cuda_pull_sources"] = kept
        return kept[1]

    def _pull(
        self, route: Route, plan: PullPlan, tensors: list[torch.Tensor], outputs: list[tuple[torch.Tensor, bool]]
    ) -> None:
        """Copy this rank's byte rows [N, W] of each tensor into its own workspace (one region per tensor), one
        barrier, then read every received row from its source's workspace into `outputs` (int32 word rows
        [received, W / 4] and whether they are 16-byte aligned)."""
        pitches = [max(align_up(rows.shape[1], ROW_ALIGN), ROW_ALIGN) for rows in tensors]
        with self._call(plan.capacity * sum(pitches)) as (workspace, region):
            words = workspace.local.view(torch.int32)
            sources = self._pull_sources(route, plan, self._word_deltas(workspace))
            pulls = []
            for rows, pitch, (out, aligned) in zip(tensors, pitches, outputs):
                workspace_rows_view(workspace, region, rows.shape[0], pitch, rows.shape[1]).copy_(rows)
                if out.shape[0] and out.shape[1]:
                    pulls.append(_Push(out, aligned, region // WORD, pitch // WORD))
                region += plan.capacity * pitch
            # Every rank's rows are in its workspace once every rank has passed this point.
            workspace.barrier(self.comm.timeout_s)
            if len(pulls) == 2 and pulls[1].src.shape[1] <= _normal_kernels().COMPANION_MAX_WORDS:
                self._launch_pull(plan, words, sources, pulls[0], pulls[1])
            else:
                for pull in pulls:
                    self._launch_pull(plan, words, sources, pull)

    def _launch_pull(
        self, plan: PullPlan, words: torch.Tensor, sources: torch.Tensor, main: _Push, companion: _Push | None = None
    ) -> None:
        """One launch of the pull kernel into `main.src` (an output here), `companion`'s rows with it."""
        kernels = _normal_kernels()
        out = main.src
        tile_rows, block, warps = kernels.tile_shape(out.shape[1])
        programs = max(1, min(self.num_sms, -(-out.shape[0] // tile_rows)))
        other, extra = _companion_arguments(main, companion, "OUT2_ALIGNED")
        kernels.pull_rows_kernel[(programs,)](
            out,
            plan.out_row,
            sources,
            plan.row,
            words,
            main.region,
            out.shape[0],
            out.stride(0),
            main.pitch,
            other.src,
            other.src.stride(0),
            other.region,
            other.pitch,
            WORDS=out.shape[1],
            ROWS=tile_rows,
            BLOCK=block,
            OUT_ALIGNED=main.aligned,
            num_warps=warps,
            **extra,
        )

    def _launch(
        self, plan: PushPlan, words: torch.Tensor, deltas: torch.Tensor, main: _Push, companion: _Push | None = None
    ) -> None:
        """One launch of the push kernel: `main`'s rows, and `companion`'s (the same rows, narrow) with them."""
        kernels = _normal_kernels()
        src = main.src
        num_rows = src.shape[0] if plan.order is None else plan.order.shape[0]
        tile_rows, block, warps = kernels.tile_shape(src.shape[1])
        programs = max(1, min(self.num_sms, -(-num_rows // tile_rows)))
        other, extra = _companion_arguments(main, companion, "SRC2_ALIGNED")
        kernels.push_rows_kernel[(programs,)](
            src,
            plan.dest,
            plan.dest if plan.order is None else plan.order,
            words,
            deltas,
            main.region,
            num_rows,
            src.stride(0),
            main.pitch,
            other.src,
            other.src.stride(0),
            other.region,
            other.pitch,
            R=self.comm.size,
            WORDS=src.shape[1],
            ROWS=tile_rows,
            BLOCK=block,
            SRC_ALIGNED=main.aligned,
            HAS_ORDER=plan.order is not None,
            num_warps=warps,
            **extra,
        )

    def _word_deltas(self, workspace: Any) -> torch.Tensor:
        """`peer_memory.word_deltas` of the current mapping (recomputed after the workspace regrew)."""
        mapping = (workspace.local.data_ptr(), workspace.nbytes)
        if self._deltas is None or self._deltas[0] != mapping:
            self._deltas = (mapping, word_deltas(workspace, self.device))
        return self._deltas[1]

    def _new_workspace(self, purpose: str = "normal") -> SymmetricWorkspace:
        """A workspace for normal mode or ("low_latency") the low-latency kernels; each Buffer owns one of each."""
        return SymmetricWorkspace(self.comm.group, self.device)
