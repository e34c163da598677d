"""The CUDA backend: normal-mode dispatch and combine as direct writes into peer GPU memory over NVLink.

First version (docs/CUDA.md has the design, the memory-ordering argument and what is not done yet):
- Peer memory is torch symmetric memory: one workspace per Buffer, allocated by every rank with the same
  size and mapped into every peer (`get_buffer`). NVLink multicast stays off: this module never touches
  multicast and sets `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` (unless already set) before it allocates.
- Normal dispatch and cached dispatch reuse the reference algorithm for everything but the transport:
  rank s writes its packed rows for rank d straight into d's workspace, at d's SPEC row offset (sources
  ascending, tokens ascending), then a device-side barrier, then d unpacks its own workspace into fresh
  tensors. Same bytes in the same order as the reference backend, so bit-identical by construction.
- Combine writes each returned row block back into its source rank's workspace, barrier, and the source
  reduces in SPEC order with a Triton kernel (`deep_ep.kernels.ordered_sum`), reading each row once.
- `num_worst_tokens`, one-rank groups and low-latency mode run the reference algorithm over the same NCCL
  group (identical results by definition; logged once each). No kernel of ours is written for them yet.

No C++ or CUDA C++ is involved: the copies are torch kernels (index_select into the peer's memory,
copy-engine memcpy for contiguous blocks) and the reduction is Triton. Nothing here imports Triton or
symmetric memory at module level, so `import deep_ep` keeps working on a CPU-only install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..comm import Comm, Pending, group_device_types
from ..kernels.ordered_sum import ordered_gather_sum, row_index_from_splits
from ..packing import RowFormat
from ..routing import Route
from .base import LowLatencyDispatchArgs
from .cuda_low_latency import CudaLowLatencyRoute, LowLatencyKernels, kernel_refusal
from .reference import ReferenceBackend

log = logging.getLogger("deep_ep.cuda")

ROW_ALIGN = 16  # bytes: workspace rows start 16-byte aligned, so copies move whole words and Triton vectorises
MIN_WORKSPACE_BYTES = 32 << 20  # regrowth costs a device sync and a collective rendezvous: start generous
SIDE_STREAMS_ENV = "DEEP_EP_CUDA_SIDE_STREAMS"  # "0": issue the per-peer copies on the current stream only
PUSH_ENV = "DEEP_EP_CUDA_PUSH"  # "select" (default): SM gather straight into peers; "copy": gather locally, memcpy
_MULTICAST_ENV = "TORCH_SYMM_MEM_DISABLE_MULTICAST"


# ---- the plan: which rows go where (pure host arithmetic, tested on the CPU) ----------------------------
@dataclass(frozen=True)
class PushCopy:
    """One contiguous block written into a peer's workspace.

    dispatch: rows `send_tokens[src_begin : src_begin + count]` of the packed token rows;
    combine: rows `[src_begin, src_begin + count)` of the rows being returned.
    They land at rows `[dst_row, dst_row + count)` of `peer`'s workspace.
    """

    peer: int
    src_begin: int
    count: int
    dst_row: int


def dispatch_plan(counts: list[list[int]], rank: int) -> list[PushCopy]:
    """The copies rank `rank` issues in a dispatch; counts[s][d] = tokens rank s sends to rank d.

    Rank d receives the rows of source s at rows [sum_{s'<s} counts[s'][d], +counts[s][d]) (SPEC 4 order);
    the rows for d sit in `send_tokens` after those of lower destinations. Peers are visited starting
    after this rank so that the ranks do not all write to the same peer first.
    """
    num_ranks = len(counts)
    copies, begin = {}, 0
    for dest in range(num_ranks):
        count = counts[rank][dest]
        if count:
            copies[dest] = PushCopy(dest, begin, count, sum(counts[s][dest] for s in range(rank)))
        begin += count
    return [copies[p] for p in _rotation(rank, num_ranks) if p in copies]


def combine_plan(counts: list[list[int]], rank: int) -> list[PushCopy]:
    """The copies rank `rank` issues in a combine: each source's block of received rows goes home.

    Rank `rank` holds source s's rows at [sum_{s'<s} counts[s'][rank], +counts[s][rank]); source s keeps
    them where its dispatch sent them, after the rows of lower destinations: row sum_{d<rank} counts[s][d].
    """
    num_ranks = len(counts)
    copies, begin = {}, 0
    for source in range(num_ranks):
        count = counts[source][rank]
        if count:
            copies[source] = PushCopy(source, begin, count, sum(counts[source][:rank]))
        begin += count
    return [copies[p] for p in _rotation(rank, num_ranks) if p in copies]


def rows_received(counts: list[list[int]], rank: int, dispatch: bool) -> int:
    """Rows that land in `rank`'s workspace: a dispatch's receive size, or a combine's send size."""
    return sum(row[rank] for row in counts) if dispatch else sum(counts[rank])


def workspace_rows(counts: list[list[int]], dispatch: bool) -> int:
    """The largest `rows_received` over all ranks: every rank computes the same value from the same counts."""
    return max((rows_received(counts, r, dispatch) for r in range(len(counts))), default=0)


def _rotation(rank: int, num_ranks: int) -> list[int]:
    return [(rank + step) % num_ranks for step in range(1, num_ranks + 1)]


def align_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def workspace_size(nbytes: int, minimum: int = MIN_WORKSPACE_BYTES) -> int:
    """Bytes to allocate for a need of `nbytes`: the next power of two, at least `minimum`, so that a slowly
    growing need regrows rarely (each regrowth is a device sync plus a collective rendezvous)."""
    return max(minimum, 1 << max(nbytes - 1, 0).bit_length())


# ---- peer memory ------------------------------------------------------------------------------------------
def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


class SymmetricWorkspace:
    """One byte buffer per rank, equal in size on every rank, each mapped into every peer (torch symmetric
    memory). Growing it is collective: every rank must call `ensure` with the same size in the same call.

    The backend uses only `ensure`, `peer`, `local` and `barrier`; the CPU tests substitute a stand-in
    with the same four members (shared files and a gloo barrier) to run the backend's logic end to end.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.nbytes = 0
        self.local: torch.Tensor | None = None
        self._handle: Any = None
        self._peers: list[torch.Tensor] = []

    def ensure(self, nbytes: int) -> None:
        """Grow to at least `nbytes` (a power of two, at least MIN_WORKSPACE_BYTES); collective when it grows."""
        if nbytes <= self.nbytes:
            return
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"the cuda backend needs a {nbytes}-byte workspace but has {self.nbytes} bytes, and it cannot grow "
                "during CUDA-graph capture; run the same call once before capturing"
            )
        size = workspace_size(nbytes)
        # Multicast must stay off; the variable is read when memory is allocated and rendezvoused.
        os.environ.setdefault(_MULTICAST_ENV, "1")
        import torch.distributed._symmetric_memory as symm_mem

        # Our queued kernels may still read the old buffer, and the barrier that ends the peers' writes into
        # it may still be queued: let all of that finish before the old buffer is released.
        torch.cuda.synchronize(self.device)
        self._peers, self._handle, self.local, self.nbytes = [], None, None, 0
        local = symm_mem.empty(size, dtype=torch.uint8, device=self.device)
        handle = _rendezvous(symm_mem, local, self.group)
        if handle.rank != self.rank or handle.world_size != self.size:
            raise RuntimeError(
                f"symmetric memory rendezvous gave rank {handle.rank} of {handle.world_size}, expected group rank "
                f"{self.rank} of {self.size}"
            )
        if _multicast_in_use(handle):
            raise RuntimeError(
                "torch symmetric memory set up NVLink multicast, which the cuda backend must not use (its barrier "
                f"would then use multimem instructions); set {_MULTICAST_ENV}=1 in every rank's environment "
                "before the first symmetric-memory allocation"
            )
        self._peers = [
            local if peer == self.rank else handle.get_buffer(peer, (size,), torch.uint8, 0)
            for peer in range(self.size)
        ]
        self.local, self._handle, self.nbytes = local, handle, size
        log.info("deep_ep cuda: workspace of %d bytes per rank (rank %d of %d)", size, self.rank, self.size)

    def peer(self, rank: int) -> torch.Tensor:
        """uint8 [nbytes] aliasing `rank`'s buffer (this rank's own buffer for itself)."""
        return self._peers[rank]

    def barrier(self, timeout_s: float) -> None:
        """Device-side barrier of all ranks on the current stream (symmetric memory signal pads).

        Each rank's barrier kernel starts after the work queued before it on this stream has finished, and
        publishes that with a system-scope release; it returns once every peer's release has been acquired.
        A peer that never arrives traps the kernel after `timeout_s` (a CUDA error) instead of hanging.
        """
        timeout_ms = max(int(timeout_s * 1000), 1)
        try:
            self._handle.barrier(channel=0, timeout_ms=timeout_ms)
        except TypeError:  # a torch whose binding takes no timeout
            self._handle.barrier(channel=0)


def _multicast_in_use(handle: Any) -> bool:
    """Whether rendezvous mapped a multicast object (only read here, to refuse it: its barrier would use it)."""
    try:
        return bool(handle.multicast_ptr)
    except Exception:  # a symmetric-memory backend without the attribute has no multicast either
        return False


def _rendezvous(symm_mem: Any, tensor: torch.Tensor, group: dist.ProcessGroup) -> Any:
    name = group.group_name
    # Before torch 2.11 a group had to be enabled for symmetric memory first; 2.11 deprecated that (it
    # resolves the group's store itself), so newer versions are left alone.
    if _torch_version() < (2, 11):
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            enable(name)
    return symm_mem.rendezvous(tensor, name)


# ---- byte-row helpers --------------------------------------------------------------------------------------
def pad_columns(rows: torch.Tensor, pitch: int) -> torch.Tensor:
    """uint8 [N, pitch]: `rows` [N, W] with zero bytes appended (no copy when W == pitch and contiguous)."""
    if rows.shape[1] == pitch and rows.is_contiguous():
        return rows
    out = rows.new_zeros(rows.shape[0], pitch)
    out[:, : rows.shape[1]] = rows
    return out


def word_view(rows: torch.Tensor) -> torch.Tensor:
    """`rows` (contiguous uint8 [N, pitch]) viewed as the widest of int64/int32/uint8 its alignment allows,
    so the copy kernels move 8 bytes per element instead of 1."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4)):
        if rows.shape[1] % size == 0 and rows.storage_offset() % size == 0 and rows.data_ptr() % size == 0:
            return rows.view(dtype)
    return rows


# ---- the backend -------------------------------------------------------------------------------------------
class CudaBackend(ReferenceBackend):
    """NVLink peer-memory transport for normal mode; the reference algorithm for what it does not serve yet."""

    name = "cuda"
    device_types = ("cuda",)
    priority = 10
    features = frozenset({"normal", "low_latency", "fp8", "int8", "any_group_size"})

    def __init__(self, comm: Comm, device: torch.device, low_latency_quant: str) -> None:
        super().__init__(comm, device, low_latency_quant)
        self._workspace: SymmetricWorkspace | None = None
        self._side_streams: list[torch.cuda.Stream] = []
        self._last_stream: torch.cuda.Stream | None = None
        self._logged: set[str] = set()
        self._low_latency = LowLatencyKernels(self)

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
    def _forward(
        self, route: Route, rows: torch.Tensor, op: str, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Pending]:
        reason = self._refusal(route, rows)
        if reason is not None:
            self._log_once(reason, logging.INFO if self.comm.size == 1 else logging.WARNING)
            return super()._forward(route, rows, op, out=out)
        received = self._push(route.all_counts, rows, dispatch=True, send_tokens=route.send_tokens)
        if out is not None:  # the caller wants the rows in its own tensor (it never aliases the workspace)
            received = out.copy_(received)
        # The caller's unpack copies out of the workspace on this stream, before the next call's barrier.
        return received, Pending(self.comm, op, [], [], on_host=False)

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
        fmt = RowFormat.of(x=x, topk_weights=topk_weights)
        rows = fmt.pack(x=x, topk_weights=topk_weights)
        returned = self._push(route.all_counts, rows, dispatch=False)
        # Rows came back where `send_tokens` lists them: destination blocks ascending, tokens ascending.
        row_index = row_index_from_splits(route.send_tokens, route.send_splits, route.num_tokens)
        combined_x = ordered_gather_sum(fmt.field_view(returned, "x"), row_index, bias)
        combined_weights = None
        if topk_weights is not None:
            combined_weights = ordered_gather_sum(fmt.field_view(returned, "topk_weights"), row_index)
        return combined_x, combined_weights, Pending(self.comm, "combine", [], [], on_host=False)

    # ---- the push ----------------------------------------------------------------------------------------
    def _push(
        self,
        counts: list[list[int]],
        rows: torch.Tensor,
        *,
        dispatch: bool,
        send_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write byte rows into the peers' workspaces per `dispatch_plan`/`combine_plan`; return this rank's
        received rows [M, W] as a view of its workspace, valid on the current stream (until the next call)."""
        rank = self.comm.rank
        width = rows.shape[1]
        pitch = max(align_up(width, ROW_ALIGN), ROW_ALIGN)
        plan = dispatch_plan(counts, rank) if dispatch else combine_plan(counts, rank)
        on_gpu = self.device.type == "cuda"
        with torch.cuda.device(self.device) if on_gpu else contextlib.nullcontext():
            if self._workspace is None:
                self._workspace = self._new_workspace()
            workspace = self._workspace
            # Same counts and row width on every rank, so every rank asks for the same size (collective).
            workspace.ensure(workspace_rows(counts, dispatch) * pitch)
            words = word_view(pad_columns(rows, pitch))
            gather_first = dispatch and os.environ.get(PUSH_ENV, "select") == "copy"
            if gather_first and plan:  # one local gather, then plain block copies (copy engines)
                words = words.index_select(0, send_tokens)
            current = torch.cuda.current_stream(self.device) if on_gpu else None
            if self._last_stream is not None and self._last_stream != current:
                # The previous call read this workspace on another stream: finish that before peers overwrite it.
                current.wait_stream(self._last_stream)
            # Barrier 1: every peer has finished reading what the previous call left in its workspace.
            workspace.barrier(self.comm.timeout_s)
            streams = self._streams_for(len(plan)) if on_gpu else []
            for copy, stream in zip(plan, streams or [current] * len(plan)):
                target = workspace.peer(copy.peer)[copy.dst_row * pitch : (copy.dst_row + copy.count) * pitch]
                target = target.view(copy.count, pitch).view(words.dtype)
                if stream is not current:
                    stream.wait_stream(current)
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    if dispatch and not gather_first:
                        tokens = send_tokens[copy.src_begin : copy.src_begin + copy.count]
                        torch.index_select(words, 0, tokens, out=target)
                    else:
                        target.copy_(words[copy.src_begin : copy.src_begin + copy.count])
            for stream in streams:
                current.wait_stream(stream)
            # Barrier 2: every peer's rows for this rank have landed.
            workspace.barrier(self.comm.timeout_s)
            self._last_stream = current
        count = rows_received(counts, rank, dispatch)
        return workspace.local[: count * pitch].view(count, pitch)[:, :width]

    def _new_workspace(self, purpose: str = "normal") -> SymmetricWorkspace:
        """A workspace for normal mode or ("low_latency") the low-latency kernels; each Buffer owns one of each."""
        return SymmetricWorkspace(self.comm.group, self.device)

    def _streams_for(self, num_copies: int) -> list[torch.cuda.Stream]:
        """Side streams for the per-peer copies, so copies to different peers overlap ([] = current stream)."""
        if num_copies <= 1 or os.environ.get(SIDE_STREAMS_ENV, "1") == "0":
            return []
        while len(self._side_streams) < num_copies:
            self._side_streams.append(torch.cuda.Stream(device=self.device))
        return self._side_streams[:num_copies]
