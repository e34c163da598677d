"""`deep_ep.Buffer`: DeepEP's public API over a pluggable backend.

The façade owns what a user sees: signatures, validation (before any communication), the collective
agreement check, events and hooks. `self.runtime` (the backend object) only moves data.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import os
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from . import checks
from . import config as _config
from .agreement import check_agreement, dtype_code, name_code, reject_agreement
from .backends import list_backends, select_backend
from .backends.base import DispatchArgs, LowLatencyDispatchArgs
from .comm import DEFAULT_TIMEOUT_S, Comm, Pending, default_timeout_s, host_sync_allowed
from .config import Config
from .errors import CommTimeoutError, UnsupportedFeatureError
from .handles import DispatchHandle, LowLatencyHandle
from .utils import EventHandle, EventOverlap, run_once

_INDEX_DTYPES = (torch.int64, torch.int32)
_COUNT_DTYPES = (torch.int32, torch.int64)
_BUFFER_IDENTITIES = itertools.count()  # handle owners: unlike id(), never reused by a later Buffer


class Buffer:
    """The communication buffer of one expert-parallel group (DeepEP's `deep_ep.Buffer`).

    Arguments are DeepEP's. Sizes (`num_nvl_bytes`, `num_rdma_bytes`, `num_qps_per_rank`) are recorded;
    the reference backend allocates no communication buffers and so does not use them.
    `backend`: a registered name or "auto" (env `DEEP_EP_BACKEND` overrides "auto").
    `low_latency_quant`: the wire format of `use_fp8=True`: "fp8" (DeepEP, e4m3 + per-128 scales) or
    "int8" (Ascend, per-token); None = the backend's native one.
    """

    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: Any = None,
        *,
        backend: str = "auto",
        low_latency_quant: str | None = None,
    ) -> None:
        if group is None:
            raise ValueError("group must be a torch.distributed ProcessGroup (got None)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        # The board's opening already waits for every rank, so it waits DEEP_EP_COMM_TIMEOUT; a bad value is
        # raised below instead, after the agreement, so that every rank fails alike.
        try:
            timeout_s = default_timeout_s()
        except ValueError:
            timeout_s = DEFAULT_TIMEOUT_S
        self._comm = Comm(group, timeout_s=timeout_s)
        if self._comm.out_of_step is not None:  # checked before the board's opening, a collective over the group
            raise CommTimeoutError(
                f"Buffer(...): a wait on this group timed out before ({self._comm.out_of_step}); its collectives may "
                "no longer pair up on every rank, so no Buffer is made on it: make a new process group"
            )
        self._comm.open_host_board()
        self.device = _default_device(self._comm)
        # The arguments are checked, then agreed on by every rank in one tiny all-gather: a rank that rejects its
        # own, or ranks that differ where they must match (the backend "auto" picked, say), fail on every rank
        # instead of leaving the others to wait in their first call.
        agreeing = False
        try:
            if comm is not None:
                raise UnsupportedFeatureError(
                    "comm= (an mpi4py communicator) is not supported; pass a torch.distributed group"
                )
            self._comm.timeout_s = default_timeout_s()
            checks.flags(
                low_latency_mode=low_latency_mode,
                explicitly_destroy=explicitly_destroy,
                enable_shrink=enable_shrink,
                allow_nvlink_for_low_latency_mode=allow_nvlink_for_low_latency_mode,
                allow_mnnvl=allow_mnnvl,
                use_fabric=use_fabric,
            )
            if enable_shrink:
                raise UnsupportedFeatureError("enable_shrink=True (elastic EP with rank masks) is not supported yet")
            qp_depth = _nvshmem_qp_depth() if low_latency_mode else None
            self.num_nvl_bytes = checks.integer("num_nvl_bytes", num_nvl_bytes, minimum=0)
            self.num_rdma_bytes = checks.integer("num_rdma_bytes", num_rdma_bytes, minimum=0)
            self.num_qps_per_rank = checks.integer("num_qps_per_rank", num_qps_per_rank, minimum=1)
            if low_latency_quant not in (None, "fp8", "int8"):
                raise ValueError(f"low_latency_quant must be None, 'fp8' or 'int8', got {low_latency_quant!r}")
            if not isinstance(backend, str):
                raise TypeError(f"backend must be a str, got {type(backend).__name__}")
            backend_class = select_backend(backend, group, self.device)
            self.low_latency_quant = low_latency_quant or backend_class.native_low_latency_quant()
            if low_latency_mode and not backend_class.supports("low_latency"):
                raise UnsupportedFeatureError(f"backend {backend_class.name!r} has no low-latency mode")
            if not backend_class.supports(self.low_latency_quant):
                raise UnsupportedFeatureError(
                    f"backend {backend_class.name!r} does not implement low_latency_quant={self.low_latency_quant!r}"
                )
            agreeing = True
            check_agreement(
                self._comm,
                "create",
                labels={"backend": list_backends(), "low_latency_quant": ["fp8", "int8"]},
                backend=name_code(backend_class.name),
                low_latency_mode=int(bool(low_latency_mode)),
                explicitly_destroy=int(bool(explicitly_destroy)),  # destroy() is collective: alike on every rank
                low_latency_quant=name_code(self.low_latency_quant),
                num_nvl_bytes=self.num_nvl_bytes,
                num_rdma_bytes=self.num_rdma_bytes,
            )
        except Exception:
            if not agreeing:  # this rank rejected its arguments: its peers fail their Buffer(...) too
                with contextlib.suppress(CommTimeoutError):
                    reject_agreement(self._comm, "create")
            self._comm.close_host_board()
            raise
        self.backend = backend_class.name
        self.low_latency_mode = low_latency_mode
        self.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode
        self.allow_mnnvl = allow_mnnvl
        self.use_fabric = use_fabric
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = False  # True is refused above
        if qp_depth is not None:
            self.nvshmem_qp_depth = qp_depth
        self.check_agreement = os.environ.get("DEEP_EP_CHECK_AGREEMENT", "1") != "0"
        # Low-latency value checks (expert ids in range, distinct per token) read the device, one host round
        # trip per call; False (env DEEP_EP_CHECK_VALUES=0) skips them, as CUDA-graph capture must (docs/ERRORS.md).
        self.check_values = os.environ.get("DEEP_EP_CHECK_VALUES", "1") != "0"
        self.runtime = backend_class(self._comm, self.device, self.low_latency_quant)
        self._destroyed = False
        self._unreceived_hook: tuple[str, Callable[[], None], object] | None = None  # (op, its hook, its mark)
        # A CPU low-latency call with async_finish receives when its event is waited on; the next low-latency
        # call finishes it first, so that two never share the backend's low-latency state.
        self._deferred_receive: Callable[[], None] | None = None
        self._combine_buffers: dict[tuple, torch.Tensor] = {}
        self._identity = next(_BUFFER_IDENTITIES)
        self._dispatches = 0  # handles made so far: every rank counts the same, so a handle's serial names its call
        self._local_buffers: dict[bool, torch.Tensor] = {}

    # ---- timeouts and lifetime --------------------------------------------------------------------
    @property
    def comm_timeout(self) -> float:
        """Seconds a call waits for peers before raising `CommTimeoutError` (env `DEEP_EP_COMM_TIMEOUT`)."""
        return self._comm.timeout_s

    @comm_timeout.setter
    def comm_timeout(self, seconds: float) -> None:
        self._check_alive()
        self._comm.timeout_s = checks.seconds("comm_timeout", seconds)

    def destroy(self) -> None:
        """Release the buffer (collective; only with `explicitly_destroy=True`); later calls raise."""
        self._check_alive()
        if not self.explicitly_destroy:
            raise ValueError("destroy() needs Buffer(..., explicitly_destroy=True); this buffer is freed on deletion")
        # A group out of step may never bring the peers to a collective, but the host board still reaches them.
        if self._comm.out_of_step is None or self._comm.board is not None:
            try:
                self._agree("destroy")
            except CommTimeoutError:
                self._release()  # a peer that does not come cannot keep this rank's side alive; say so, though
                raise
        self._release()

    def _release(self) -> None:
        self._comm.close_host_board()
        self._combine_buffers.clear()
        self._local_buffers.clear()
        self._destroyed = True

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed; create a new one")

    # ---- static helpers (DeepEP) ------------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: what DeepEP code reads this as (fp8 dispatch, and groups beyond one node, as DeepEP builds with
        SM90 features and NVSHMEM offer) is there on every backend. It says nothing about Hopper kernels."""
        return True

    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        """Set the SM count the default configs use (DeepEP requires it even)."""
        new_num_sms = checks.integer("new_num_sms", new_num_sms, minimum=2)
        if new_num_sms % 2 != 0:
            raise ValueError(f"new_num_sms={new_num_sms} must be even")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event marking "now" on the current stream (on the CPU: already complete)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Bytes of the RDMA buffer that low-latency mode needs (DeepEP's formula, SPEC section 1)."""
        return _config.low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's tuned dispatch config for `num_ranks` (a documented default for other sizes)."""
        return _config.dispatch_config(num_ranks, num_sms=Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's tuned combine config for `num_ranks` (a documented default for other sizes)."""
        return _config.combine_config(num_ranks, num_sms=Buffer.num_sms)

    def get_comm_stream(self) -> Any:
        """The stream communication runs on: the current CUDA stream, or None on the CPU."""
        self._check_alive()
        if self.device.type == "cuda":
            return torch.cuda.current_stream(self.device)
        return None

    def get_local_buffer_tensor(
        self, dtype: torch.dtype, size: torch.Size | None = None, offset: int = 0, use_rdma_buffer: bool = False
    ) -> torch.Tensor:
        """A tensor view of this rank's local buffer (`num_nvl_bytes`, or `num_rdma_bytes` with use_rdma_buffer)."""
        self._check_alive()
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__} {dtype!r}")
        offset = checks.integer("offset", offset, minimum=0)
        shape = None if size is None else _sizes("size", size)
        use_rdma_buffer = checks.flag("use_rdma_buffer", use_rdma_buffer)  # a bool: one buffer per kind
        total = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        if use_rdma_buffer not in self._local_buffers:
            self._local_buffers[use_rdma_buffer] = torch.zeros(total, dtype=torch.uint8, device=self.device)
        element = dtype.itemsize
        if offset % element or offset > total:
            raise ValueError(f"offset={offset} must be in [0, {total}] and a multiple of {element}")
        whole = (total - offset) // element * element  # DeepEP's view ignores a last partial element
        view = self._local_buffers[use_rdma_buffer][offset : offset + whole].view(dtype)
        if shape is None:
            return view
        count = 1
        for s in shape:
            count *= s
        if count > view.numel():
            raise ValueError(f"size={shape} needs {count * element} bytes; {total - offset} are left after offset")
        return view[:count].view(shape)

    # ---- shared plumbing --------------------------------------------------------------------------
    def _agreement_on(self) -> bool:
        # The check reads its all-gather on the host, which a CUDA graph being captured cannot do.
        return self.check_agreement and host_sync_allowed(self.device)

    def _agree(self, op: str, **fields: int) -> None:
        if self._agreement_on():
            check_agreement(self._comm, op, **fields)

    @contextlib.contextmanager
    def _collective(self, op: str) -> Iterator[Callable[..., None]]:
        """The body of one call that communicates. Arguments are checked on this rank first, then
        `agree(op, **fields)` swaps them with every rank. If this rank rejects its arguments before that, it
        still takes part in the swap with a rejected row: its peers raise too instead of pairing their call with
        this rank's next one, so the ranks stay in step."""
        self._check_alive()
        agreed = False

        def agree(name: str, **fields: int) -> None:
            nonlocal agreed
            fields = {key: operator.index(value) for key, value in fields.items()}  # a bad one rejects, unsent
            agreed = True
            self._agree(name, **fields)

        try:
            if self._comm.out_of_step is not None:
                raise CommTimeoutError(
                    f"{op}: an earlier call timed out waiting for a peer in a collective over the group "
                    f"({self._comm.out_of_step}); the ranks' calls may no longer pair up, so this Buffer refuses "
                    "every call: create a new process group and Buffer"
                )
            yield agree
        except Exception:
            if not agreed:
                self._reject(op)
            raise

    def _reject(self, op: str) -> None:
        """This rank's part in `op`'s agreement when it rejected its arguments to `op` (here or in a caller that
        checks before calling `op`): a rejected row, so its peers raise in their `op` instead of waiting."""
        # Over the board the rejection still reaches the peers when the group is out of step (not over it).
        reachable = self._comm.out_of_step is None or self._comm.board is not None
        if not self._destroyed and reachable and self._agreement_on():
            with contextlib.suppress(CommTimeoutError):  # this rank's own error is the one to report
                reject_agreement(self._comm, op)

    def _begin(self, previous_event: EventOverlap | None, async_finish: bool, allocate_on_comm_stream: bool) -> None:
        checks.flags(async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(f"previous_event must be an EventOverlap or None, got {type(previous_event).__name__}")
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True (as in DeepEP)")
        if previous_event is not None:
            previous_event.current_stream_wait()

    def _finish(self, pending: Pending, async_finish: bool, device: torch.device, keep: tuple = ()) -> EventOverlap:
        """Complete now, or (CPU + async_finish) leave the completion to the returned event."""
        if async_finish and device.type == "cpu":
            return EventOverlap(EventHandle(device, finish=pending.wait), keep or None)
        pending.wait()
        return EventOverlap(EventHandle(device) if async_finish else None, keep or None)

    def _config(self, config: Config | None, default: Callable[[int], Config]) -> Config:
        if config is None:
            return default(self.group_size)
        if not isinstance(config, Config):
            raise TypeError(f"config must be a deep_ep.Config or None, got {type(config).__name__}")
        if config.num_sms < 2:  # DeepEP's kernels run num_sms / 2 channels
            raise ValueError(f"config.num_sms={config.num_sms} gives no channel; it must be >= 2")
        return config

    def _num_experts_check(self, name: str, num_experts: int) -> int:
        num_experts = checks.integer(name, num_experts, minimum=1)
        if num_experts % self.group_size:
            raise ValueError(f"{name}={num_experts} is not divisible by num_ranks={self.group_size}")
        return num_experts

    # ---- normal mode: layout (SPEC section 3) ------------------------------------------------------
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """Count tokens per rank / node / expert from the routing (local, no communication).

        Arguments:
            topk_idx: int64 (or int32) [N, K], -1 = no expert.
            num_experts: E, divisible by the group size.
        Returns:
            num_tokens_per_rank int32 [R]; num_tokens_per_rdma_rank int32 [ceil(R/8)] or None when R <= 8;
            num_tokens_per_expert int32 [E]; is_token_in_rank bool [N, R]; event.
        """
        self._check_alive()
        self._begin(previous_event, async_finish, allocate_on_comm_stream)
        checks.tensor("topk_idx", topk_idx, dtypes=_INDEX_DTYPES, dim=2)
        num_experts = self._num_experts_check("num_experts", num_experts)
        checks.expert_ids("topk_idx", topk_idx, num_experts)
        layout = self.runtime.get_dispatch_layout(topk_idx, num_experts)
        event = EventOverlap(EventHandle(topk_idx.device)) if async_finish else EventOverlap()
        return (*layout, event)

    # ---- normal mode: dispatch (SPEC section 4) ----------------------------------------------------
    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: tuple | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[Any, torch.Tensor | None, torch.Tensor | None, list[int] | None, tuple | None, EventOverlap]:
        """Send each token to every rank that holds one of its experts.

        Arguments:
            x: [N, H] of any dtype, or a tuple (x_q [N, H], x_scales [N, S] or [N]) that travels unchanged.
            handle: a handle from a previous dispatch of this Buffer: cached mode, same routing as then.
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert:
                the layout from `get_dispatch_layout` (required without a handle).
            topk_idx: int64 [N, K] (-1 = none) and topk_weights: float32 [N, K], together or not at all.
            expert_alignment: round each count of `num_recv_tokens_per_expert_list` up to this multiple.
            num_worst_tokens: > 0: receive tensors get exactly this many rows, no host synchronisation.
            config: a `Config` (its num_sms // 2 is the channel count of the handle's channel matrices).
        Returns:
            recv_x ([num_recv, H], or a tuple with scales), recv_topk_idx (topk_idx's dtype [num_recv, K],
            local expert ids or -1), recv_topk_weights (float32 [num_recv, K]), num_recv_tokens_per_expert_list
            (list[int] of length L; [] with num_worst_tokens), handle, event. Cached mode returns
            (recv_x, None, None, None, None, event).
        """
        with self._collective("dispatch" if handle is None else "cached_dispatch") as agree:
            self._begin(previous_event, async_finish, allocate_on_comm_stream)
            x_data, x_scales = _split_x(x)
            checks.tensor("x", x_data, dim=2)
            device = x_data.device
            num_tokens, hidden = x_data.shape
            checks.integer("x.shape[1]", hidden, minimum=1)
            if x_scales is not None:
                checks.tensor("x_scales", x_scales, dim=(1, 2), device=device)
                if x_scales.shape[0] != num_tokens:
                    raise ValueError(f"x_scales has {x_scales.shape[0]} rows but x has {num_tokens}")
            num_worst_tokens = checks.integer("num_worst_tokens", num_worst_tokens, minimum=0)
            config = self._config(config, self.get_dispatch_config)
            self.runtime.num_sms = config.num_sms
            row_bytes = hidden * x_data.element_size()  # x is 2-D (checked)
            scales_row_bytes = -1
            if x_scales is not None:
                scales_row_bytes = (x_scales.shape[1] if x_scales.dim() == 2 else 1) * x_scales.element_size()

            if handle is not None:
                if topk_idx is not None or topk_weights is not None:
                    raise ValueError(
                        "cached dispatch (handle given) takes no topk_idx/topk_weights: the routing is the handle's"
                    )
                route = self._own_handle(handle, DispatchHandle).route
                if num_tokens != route.num_tokens:
                    raise ValueError(f"x has {num_tokens} tokens but the handle routed {route.num_tokens}")
                if num_worst_tokens not in (0, handle.num_worst_tokens):
                    raise ValueError(
                        f"num_worst_tokens={num_worst_tokens} differs from the handle's {handle.num_worst_tokens}"
                    )
                agree(
                    "cached_dispatch",
                    on_buffer_device=int(device == self.device),
                    hidden=hidden,
                    x_dtype=dtype_code(x_data.dtype),
                    x_row_bytes=row_bytes,
                    scales_dtype=dtype_code(None if x_scales is None else x_scales.dtype),
                    scales_row_bytes=scales_row_bytes,
                    num_worst_tokens=handle.num_worst_tokens,
                    handle_serial=handle.serial,
                )
                recv_x, recv_scales, pending = self.runtime.cached_dispatch(x_data, x_scales, route)
                event = self._finish(pending, async_finish, device)
                return _join_x(recv_x, recv_scales), None, None, None, None, event

            num_ranks = self.group_size
            if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
                raise ValueError(
                    "dispatch without a handle needs the layout: num_tokens_per_rank, is_token_in_rank and "
                    "num_tokens_per_expert (from get_dispatch_layout)"
                )
            checks.tensor(
                "num_tokens_per_rank", num_tokens_per_rank, dtypes=_COUNT_DTYPES, shape=(num_ranks,), device=device
            )
            checks.tensor(
                "is_token_in_rank", is_token_in_rank, dtypes=(torch.bool,), shape=(num_tokens, num_ranks), device=device
            )
            checks.tensor("num_tokens_per_expert", num_tokens_per_expert, dtypes=_COUNT_DTYPES, dim=1, device=device)
            if num_tokens_per_rdma_rank is not None:
                checks.tensor(
                    "num_tokens_per_rdma_rank",
                    num_tokens_per_rdma_rank,
                    dtypes=_COUNT_DTYPES,
                    shape=(-(-num_ranks // 8),),
                    device=device,
                )
            num_experts = self._num_experts_check("num_tokens_per_expert.numel()", num_tokens_per_expert.numel())
            if (topk_idx is None) != (topk_weights is None):
                raise ValueError("topk_idx and topk_weights must be given together or not at all")
            num_topk = -1
            if topk_idx is not None:
                checks.tensor("topk_idx", topk_idx, dtypes=_INDEX_DTYPES, dim=2, device=device)
                num_topk = topk_idx.shape[1]
                checks.tensor("topk_idx", topk_idx, shape=(num_tokens, num_topk))
                checks.tensor(
                    "topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk), device=device
                )
            expert_alignment = checks.integer("expert_alignment", expert_alignment, minimum=1)
            num_channels = config.num_sms // 2
            agree(
                "dispatch",
                on_buffer_device=int(device == self.device),
                hidden=hidden,
                x_dtype=dtype_code(x_data.dtype),
                x_row_bytes=row_bytes,
                scales_row_bytes=scales_row_bytes,
                num_topk=num_topk,
                topk_dtype=dtype_code(None if topk_idx is None else topk_idx.dtype),
                num_experts=num_experts,
                num_channels=num_channels,
                num_worst_tokens=num_worst_tokens,
                scales_dtype=dtype_code(None if x_scales is None else x_scales.dtype),
            )
            args = DispatchArgs(
                x_data,
                x_scales,
                num_tokens_per_rank,
                is_token_in_rank,
                num_tokens_per_expert,
                topk_idx,
                topk_weights,
                expert_alignment,
                num_worst_tokens,
                num_channels,
            )
            out, route, pending = self.runtime.dispatch(args)
            handle = DispatchHandle(out["handle"], self._identity, self._dispatches, route, num_worst_tokens)
            self._dispatches += 1
            handle.complete = pending.wait  # a later call with the handle may come before the event is waited on
            event = self._finish(pending, async_finish, device)
            recv_x = _join_x(out["recv_x"], out["recv_x_scales"])
            return (
                recv_x,
                out["recv_topk_idx"],
                out["recv_topk_weights"],
                out["num_recv_tokens_per_expert_list"],
                handle,
                event,
            )

    # ---- normal mode: combine (SPEC section 5) -----------------------------------------------------
    def combine(
        self,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Send expert outputs back to their tokens' ranks and sum them per token (no weights applied).

        Arguments:
            x: bf16 (reference backend: also fp16/fp32/fp64) [num_recv, H], row i = row i of dispatch's recv_x.
            handle: the dispatch's handle. topk_weights: float32 [num_recv, K] or None.
            bias: None, a tensor, or a pair, each [N, H] of x's dtype, added first.
        Returns:
            combined_x [N, H] (x's dtype): fp32 sum of bias_0, bias_1, then rows by destination rank
            ascending, one rounding; combined_topk_weights float32 [N, K] or None; event.
        """
        with self._collective("combine") as agree:
            self._begin(previous_event, async_finish, allocate_on_comm_stream)
            handle = self._own_handle(handle, DispatchHandle)
            route = handle.route
            self.runtime.num_sms = self._config(config, self.get_combine_config).num_sms
            checks.tensor("x", x, dtypes=self.runtime_combine_dtypes(), dim=2)
            checks.integer("x.shape[1]", x.shape[1], minimum=1)
            device = x.device
            if x.shape[0] != route.num_recv:
                raise ValueError(f"x has {x.shape[0]} rows but the handle's dispatch received {route.num_recv}")
            num_topk = -1
            if topk_weights is not None:
                checks.tensor("topk_weights", topk_weights, dtypes=(torch.float32,), dim=2, device=device)
                num_topk = topk_weights.shape[1]
                checks.tensor("topk_weights", topk_weights, shape=(route.num_recv, num_topk))
            biases = _bias_tuple(bias)
            for name, b in biases:
                checks.tensor(name, b, dtypes=(x.dtype,), shape=(route.num_tokens, x.shape[1]), device=device)
            agree(
                "combine",
                on_buffer_device=int(device == self.device),
                hidden=x.shape[1],
                x_dtype=dtype_code(x.dtype),
                num_topk=num_topk,
                num_worst_tokens=handle.num_worst_tokens,
                handle_serial=handle.serial,
            )
            # Values are read, never differentiated (as DeepEP; deep_ep.autograd makes combine differentiable),
            # the same way on every rank whichever path a rank's sum takes.
            weights = None if num_topk <= 0 else topk_weights.detach()  # K = 0: nothing to sum
            biases = tuple(b.detach() for _, b in biases)
            combined_x, combined_weights, pending = self.runtime.combine(x.detach(), route, weights, biases)
            if num_topk == 0:
                combined_weights = topk_weights.new_zeros(route.num_tokens, 0)
            event = self._finish(pending, async_finish, device)
            return combined_x, combined_weights, event

    def runtime_combine_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtypes the backend's combine accepts for x."""
        return getattr(self.runtime, "combine_dtypes", (torch.bfloat16, torch.float16, torch.float32))

    def _own_handle(self, handle: Any, kind: type) -> Any:
        if not isinstance(handle, (DispatchHandle, LowLatencyHandle)):
            raise TypeError(
                f"handle must be the handle a dispatch of this Buffer returned, got {type(handle).__name__}"
            )
        if not isinstance(handle, kind):
            mode = "low-latency" if isinstance(handle, LowLatencyHandle) else "normal-mode"
            raise ValueError(f"handle comes from a {mode} dispatch; this call needs a {kind.__name__}")
        if handle.owner != self._identity:
            raise ValueError("handle comes from another Buffer; pass the handle this Buffer's dispatch returned")
        handle.complete()
        return handle

    # ---- low-latency mode (SPEC section 6) -------------------------------------------------------
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """DeepEP's reset of the low-latency buffers. Nothing needs one here (the reference backend keeps none between
        calls; the cuda backend zeroes its workspace itself when the layout changes), so the arguments are checked.
        A receive whose hook was never called (the hook lost to an exception, say) is finished here (filling
        that call's outputs and statistics, as its hook would have), so the next low-latency call may go on.
        The zero-copy staging tensor stays (DeepEP's clean zeroes only its signalling words): one obtained from
        `get_next_low_latency_combine_buffer` before the clean is still what `zero_copy=True` reads."""
        self._check_alive()
        self._require_low_latency()
        # The lost receive first, whatever the arguments: it is collective on some backends (a barrier), so a rank
        # whose arguments are refused must still take its part, or its peers wait in it.
        if self._unreceived_hook is not None:
            self._unreceived_hook[1]()  # clears the mark first, then receives (what peers sent must be taken)
        checks.integer("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
        checks.integer("hidden", hidden, minimum=1)
        self._num_experts_check("num_experts", num_experts)

    def _require_low_latency(self) -> None:
        if not self.low_latency_mode:
            raise ValueError("low-latency calls need Buffer(..., low_latency_mode=True)")

    def _check_hook(self) -> None:
        if self._unreceived_hook is not None:
            raise RuntimeError(
                f"the hook of the previous {self._unreceived_hook[0]} was not called; call it before the next "
                "low-latency operation on this Buffer"
            )
        receive, self._deferred_receive = self._deferred_receive, None
        if receive is not None:
            # A failure belongs to that call: it is raised where its event is waited on, not here.
            with contextlib.suppress(Exception):
                receive()

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[Any, torch.Tensor, tuple, EventOverlap, Callable[[], None] | None]:
        """Send one message per (token, selected expert) into per-expert receive slots; the exchange needs no host
        sync (the value checks read topk_idx on the host unless `check_values` is off or a graph is captured).

        Arguments:
            x: bf16 [N, H], N <= num_max_dispatch_tokens_per_rank (T, equal on all ranks).
            topk_idx: int64 [N, K], -1 = none. num_experts: E, divisible by the group size.
            cumulative_local_expert_recv_stats: int32 [L], incremented by recv_count.
            dispatch_wait_recv_cost_stats: int64 [R], incremented by the host's time in the receive (ns; on the
                cuda backend its enqueue time, not the device's wait: docs/SEMANTICS.md).
            use_fp8: quantise on the wire with this Buffer's `low_latency_quant`; round_scale / use_ue8m0:
            DeepEP's power-of-two scales and their packed form (fp8 only; no effect with use_fp8=False, as in DeepEP).
            async_finish / return_recv_hook: finish later through the event / the returned hook.
        Returns:
            recv_x: bf16 [L, R*T, H]; or (float8_e4m3fn [L, R*T, H], float32 [L, R*T, H//128] column-major
            scales, int32 [L, R*T, H//512] with use_ue8m0); or with int8: (int8 [L, R*T, H], float32 [L, R*T]).
            recv_count int32 [L]; handle (src_info, layout_range, T, H, E); event; hook (or None).
        """
        with self._collective("low_latency_dispatch") as agree:
            self._require_low_latency()
            self._check_hook()  # first: a deferred receive is collective on some backends (a barrier)
            checks.flags(
                use_fp8=use_fp8,
                round_scale=round_scale,
                use_ue8m0=use_ue8m0,
                async_finish=async_finish,
                return_recv_hook=return_recv_hook,
            )
            checks.tensor("x", x, dtypes=(torch.bfloat16,), dim=2)
            device = x.device
            num_tokens, hidden = x.shape
            checks.integer("x.shape[1]", hidden, minimum=1)
            checks.tensor("topk_idx", topk_idx, dtypes=_INDEX_DTYPES, dim=2, device=device)
            if topk_idx.shape[0] != num_tokens:
                raise ValueError(f"topk_idx has {topk_idx.shape[0]} rows but x has {num_tokens} tokens")
            tokens_cap = checks.integer("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
            if num_tokens > tokens_cap:
                raise ValueError(f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank={tokens_cap}")
            num_experts = self._num_experts_check("num_experts", num_experts)
            experts_per_rank = num_experts // self.group_size
            dispatched_ids = None
            if self.check_values and host_sync_allowed(device):  # they read the device: not under graph capture
                dispatched_ids = checks.expert_id_values("topk_idx", topk_idx, num_experts, distinct=True)
                if dispatched_ids.data_ptr() == topk_idx.data_ptr():  # a CPU topk_idx itself: the caller may rewrite it
                    dispatched_ids = dispatched_ids.clone()
            if use_ue8m0 and not round_scale:
                raise ValueError("use_ue8m0=True needs round_scale=True")
            if async_finish and return_recv_hook:
                raise ValueError("async_finish and return_recv_hook cannot both be set")
            quant = self.low_latency_quant
            if use_fp8 and quant == "fp8":
                if hidden % (512 if use_ue8m0 else 128):
                    raise ValueError(
                        f"hidden={hidden} must be a multiple of {512 if use_ue8m0 else 128} for fp8"
                        f"{' with use_ue8m0' if use_ue8m0 else ''}"
                    )
            elif use_fp8 and (round_scale or use_ue8m0):
                raise ValueError(f"round_scale/use_ue8m0 apply to the fp8 format only, not {quant!r}")
            if not use_fp8:
                # bf16 carries no scales: DeepEP ignores both flags here, and callers (SGLang's bf16 dispatch)
                # pass them regardless; cleared so that ranks differing only in them still agree.
                round_scale = use_ue8m0 = False
            reason = self.runtime.max_hidden_error(hidden, "low_latency")
            if reason:
                raise ValueError(reason)
            if cumulative_local_expert_recv_stats is not None:
                checks.tensor(
                    "cumulative_local_expert_recv_stats",
                    cumulative_local_expert_recv_stats,
                    dtypes=(torch.int32,),
                    shape=(experts_per_rank,),
                    device=device,
                    written=True,
                )
            if dispatch_wait_recv_cost_stats is not None:
                checks.tensor(
                    "dispatch_wait_recv_cost_stats",
                    dispatch_wait_recv_cost_stats,
                    dtypes=(torch.int64,),
                    shape=(self.group_size,),
                    device=device,
                    written=True,
                )
            agree(
                "low_latency_dispatch",
                on_buffer_device=int(device == self.device),
                num_max_dispatch_tokens_per_rank=tokens_cap,
                hidden=hidden,
                num_experts=num_experts,
                num_topk=topk_idx.shape[1],
                use_fp8=int(use_fp8),
                quant=0 if quant == "fp8" else 1,
                round_scale=int(round_scale),
                use_ue8m0=int(use_ue8m0),
            )
            args = LowLatencyDispatchArgs(
                x, topk_idx.long(), tokens_cap, num_experts, use_fp8, quant, round_scale, use_ue8m0
            )
            out, route, pending = self.runtime.low_latency_dispatch(args)
            handle = LowLatencyHandle(
                (out["src_info"], out["layout_range"], tokens_cap, hidden, num_experts),
                self._identity,
                self._dispatches,
                route,
                num_tokens,
                topk_idx.shape[1],
                dispatched_ids,
            )
            self._dispatches += 1

            @run_once
            def receive() -> None:
                start = time.perf_counter_ns()
                pending.wait()
                if dispatch_wait_recv_cost_stats is not None and host_sync_allowed(device):  # one wait for all sources
                    dispatch_wait_recv_cost_stats.add_(time.perf_counter_ns() - start)
                if cumulative_local_expert_recv_stats is not None:
                    cumulative_local_expert_recv_stats.add_(out["recv_count"])

            handle.complete = receive  # a combine with the handle may come before the event or hook

            recv_x = out["recv_x"] if "recv_scales" not in out else (out["recv_x"], out["recv_scales"])
            event, hook = self._ll_finish(receive, "low_latency_dispatch", async_finish, return_recv_hook, device)
            return recv_x, out["recv_count"], handle, event, hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None] | None]:
        """Send expert outputs back and reduce them per token with the top-k weights (SPEC 6.3).

        Arguments:
            x: bf16 [L, R*T, H] (rows as low_latency_dispatch delivered them). topk_idx / topk_weights:
            int64 / float32 [N, K], the dispatched ones. handle: the low-latency dispatch's handle.
            zero_copy: read x from `get_next_low_latency_combine_buffer(handle)` instead.
            out: optional bf16 [N, H] to write into. use_logfmt: not supported (raises).
            combine_wait_recv_cost_stats: int64 [R], incremented as dispatch_wait_recv_cost_stats is.
        Returns:
            combined_x bf16 [N, H]: fp32 sum over valid k of fp32(w) * fp32(row), from +0.0; event; hook.
        """
        with self._collective("low_latency_combine") as agree:
            self._require_low_latency()
            self._check_hook()  # first: a deferred receive is collective on some backends (a barrier)
            checks.flags(
                use_logfmt=use_logfmt, zero_copy=zero_copy, async_finish=async_finish, return_recv_hook=return_recv_hook
            )
            if use_logfmt:
                raise UnsupportedFeatureError("use_logfmt=True (LogFMT combine compression) is not supported")
            handle = self._own_handle(handle, LowLatencyHandle)
            _, _, tokens_cap, hidden, num_experts = handle
            experts_per_rank = num_experts // self.group_size
            rows = self.group_size * tokens_cap
            if zero_copy:
                key = (experts_per_rank, rows, hidden)
                if key not in self._combine_buffers:
                    raise ValueError(
                        "zero_copy=True needs get_next_low_latency_combine_buffer(handle) to be filled first"
                    )
                x = self._combine_buffers[key]
            checks.tensor("x", x, dtypes=(torch.bfloat16,), shape=(experts_per_rank, rows, hidden))
            device = x.device
            # SPEC 6.3: the dispatched topk_idx (a choice the dispatch did not send has no row to combine).
            checks.tensor("topk_idx", topk_idx, dtypes=_INDEX_DTYPES, dim=2, device=device)
            num_tokens, num_topk = topk_idx.shape
            if (num_tokens, num_topk) != (handle.num_tokens, handle.num_topk):
                raise ValueError(
                    f"topk_idx has shape {list(topk_idx.shape)} but the handle's dispatch had "
                    f"[{handle.num_tokens}, {handle.num_topk}]: pass the dispatched topk_idx"
                )
            if self.check_values and host_sync_allowed(device):
                ids = checks.expert_id_values("topk_idx", topk_idx, num_experts, distinct=False)
                if handle.dispatched_ids is not None:
                    checks.same_ids("topk_idx", ids, handle.dispatched_ids)
            checks.tensor(
                "topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk), device=device
            )
            if out is None:
                out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=device)
            else:
                checks.tensor(
                    "out", out, dtypes=(torch.bfloat16,), shape=(num_tokens, hidden), device=device, written=True
                )
            if combine_wait_recv_cost_stats is not None:
                checks.tensor(
                    "combine_wait_recv_cost_stats",
                    combine_wait_recv_cost_stats,
                    dtypes=(torch.int64,),
                    shape=(self.group_size,),
                    device=device,
                    written=True,
                )
            if async_finish and return_recv_hook:
                raise ValueError("async_finish and return_recv_hook cannot both be set")
            agree(
                "low_latency_combine",
                on_buffer_device=int(device == self.device),
                num_max_dispatch_tokens_per_rank=tokens_cap,
                hidden=hidden,
                num_experts=num_experts,
                num_topk=num_topk,
                handle_serial=handle.serial,
            )
            # The combine reads values only (DeepEP's is not differentiable either): no autograd graph.
            x, topk_weights = x.detach(), topk_weights.detach()
            pending = self.runtime.low_latency_combine(x, topk_idx.long(), topk_weights, handle.route, out)

            @run_once
            def receive() -> None:
                start = time.perf_counter_ns()
                pending.wait()
                if combine_wait_recv_cost_stats is not None and host_sync_allowed(device):  # as the dispatch's
                    combine_wait_recv_cost_stats.add_(time.perf_counter_ns() - start)

            event, hook = self._ll_finish(receive, "low_latency_combine", async_finish, return_recv_hook, device)
            return out, event, hook

    def _ll_finish(
        self, receive: Callable[[], None], op: str, async_finish: bool, return_recv_hook: bool, device: torch.device
    ) -> tuple[EventOverlap, Callable[[], None] | None]:
        if return_recv_hook:
            # The hook holds its Buffer weakly and is marked by a token, not by itself: a hook that referred to
            # itself and its Buffer made a cycle that kept a dropped Buffer (and its board) until a cyclic collection.
            owner, mark = weakref.ref(self), object()

            def hook() -> None:
                buffer = owner()
                # Only this call's hook clears the mark: an older hook called again must not clear a newer one's.
                if buffer is not None and buffer._unreceived_hook is not None and buffer._unreceived_hook[2] is mark:
                    buffer._unreceived_hook = None
                receive()

            self._unreceived_hook = (op, hook, mark)
            return EventOverlap(), hook
        if async_finish and device.type == "cpu":

            def finish() -> None:
                if self._deferred_receive is receive:
                    self._deferred_receive = None  # waited on: the next call has nothing to finish
                receive()

            self._deferred_receive = receive
            return EventOverlap(EventHandle(device, finish=finish)), None
        receive()
        return EventOverlap(EventHandle(device) if async_finish else None), None

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The bf16 [L, R*T, H] tensor that `low_latency_combine(..., zero_copy=True)` reads."""
        self._check_alive()
        self._require_low_latency()
        handle = self._own_handle(handle, LowLatencyHandle)
        src_info, _, tokens_cap, hidden, num_experts = handle
        key = (num_experts // self.group_size, self.group_size * tokens_cap, hidden)
        if key not in self._combine_buffers:
            self._combine_buffers[key] = torch.zeros(key, dtype=torch.bfloat16, device=src_info.device)
        return self._combine_buffers[key]

    # ---- DeepEP's internal entry points ----------------------------------------------------------
    def internode_dispatch(self, *args: Any, **kwargs: Any) -> None:
        raise UnsupportedFeatureError(
            "internode_dispatch (DeepEP's internal path, with its multi-node handle layout) is not provided: call "
            "dispatch(), which serves groups of any size and returns the intranode handle layout"
        )

    def internode_combine(self, *args: Any, **kwargs: Any) -> None:
        raise UnsupportedFeatureError(
            "internode_combine (DeepEP's internal path, with its multi-node handle layout) is not provided: call "
            "combine() with the handle dispatch() returned"
        )

    # ---- elastic EP (DeepEP's enable_shrink) -------------------------------------------------------
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        raise UnsupportedFeatureError("low_latency_update_mask_buffer needs enable_shrink, which is not supported yet")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        raise UnsupportedFeatureError("low_latency_query_mask_buffer needs enable_shrink, which is not supported yet")

    def low_latency_clean_mask_buffer(self) -> None:
        raise UnsupportedFeatureError("low_latency_clean_mask_buffer needs enable_shrink, which is not supported yet")


def _nvshmem_qp_depth() -> int:
    """DeepEP's `nvshmem_qp_depth` (env NVSHMEM_QP_DEPTH, default 1024): read by DeepEP code; no backend here uses
    NVSHMEM, so it bounds nothing. Checked before the agreement, so that a bad value fails every rank alike."""
    raw = os.environ.get("NVSHMEM_QP_DEPTH", "1024")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"NVSHMEM_QP_DEPTH={raw!r} must be an integer") from None
    return checks.integer("NVSHMEM_QP_DEPTH", value, minimum=1)


def _default_device(comm: Comm) -> torch.device:
    """The device a group's collectives naturally use: the current accelerator for NCCL/HCCL, else the CPU."""
    for kind in ("cuda", "npu", "xpu"):
        module = getattr(torch, kind, None)
        if kind in comm.device_types and module is not None and module.is_available():
            return torch.device(kind, module.current_device())
    return torch.device("cpu")


def _sizes(name: str, value: Any) -> list[int]:
    """A shape argument (a torch.Size or a sequence of ints) as a list of sizes >= 0."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a torch.Size or a sequence of ints, got {type(value).__name__} {value!r}")
    return [checks.integer(f"{name}[{i}]", s, minimum=0) for i, s in enumerate(value)]


def _split_x(x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"x as a tuple must be (x, x_scales), got {len(x)} items")
        return x[0], x[1]
    return x, None


def _join_x(x: torch.Tensor, scales: torch.Tensor | None) -> Any:
    return x if scales is None else (x, scales)


def _bias_tuple(bias: Any) -> tuple[tuple[str, torch.Tensor], ...]:
    """The biases given, in order, each with the name errors call it by (its place in the pair)."""
    if bias is None:
        return ()
    if isinstance(bias, torch.Tensor):
        return (("bias", bias),)
    if isinstance(bias, (tuple, list)) and len(bias) <= 2:
        return tuple((f"bias[{i}]", b) for i, b in enumerate(bias) if b is not None)
    raise TypeError(f"bias must be None, a tensor, or a pair of tensors, got {type(bias).__name__}")
