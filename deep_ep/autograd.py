"""Normal-mode dispatch and combine as autograd functions (the glue Megatron's `fused_a2a.py` writes).

- `dispatch`: forward = `get_dispatch_layout` + `Buffer.dispatch`; backward = `Buffer.combine` of the
  gradient of `recv_x`, with the gradient of `recv_topk_weights` (masked to the pairs that are local on
  this rank, so a gradient on a zeroed, non-local slot never leaks back) as `topk_weights`.
- `combine`: forward = `Buffer.combine`; backward = cached `Buffer.dispatch` of the gradient (the gradient
  of `combined_topk_weights` travels with it, in the scales slot), and the gradient itself for `bias`.

Both functions communicate in backward, so every rank of the group must run backward through every
dispatch/combine it ran forward (in the same order), and `requires_grad` must agree across ranks, as for
any collective autograd op.

Weights: the DeepEP wire format for `topk_weights` is float32, and float32 weights use it. Weights of another
dtype (float64, for gradcheck) travel exactly: in dispatch as the `x_scales` of an `(x, weights)` pair, in
combine and in backward as a second combine of the weights as `x` (the reference backend sums float64 in
float64, in SPEC order).

Asynchronous use (`async_finish=True`): as with `Buffer`, the outputs must not be read before
`result.event.current_stream_wait()` (or `with result.event:`); the returned event completes the
operation with autograd off, so the filled outputs keep their place in the graph. Backward passes always
complete before returning (autograd consumes gradients at once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .agreement import dtype_code
from .buffer import Buffer
from .config import Config
from .utils import EventOverlap, run_once

__all__ = ["CombineResult", "DispatchResult", "combine", "dispatch"]


class DispatchResult(NamedTuple):
    """recv_x [num_recv, H] (x's dtype); recv_topk_idx [num_recv, K] of topk_idx's dtype (local ids, -1 = not here);
    recv_topk_weights [num_recv, K] (topk_weights' dtype, 0 where not local);
    num_recv_tokens_per_expert_list list[int] [L] (aligned; [] with num_worst_tokens); handle; event."""

    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert_list: list[int]
    handle: tuple
    event: EventOverlap


class CombineResult(NamedTuple):
    """combined_x [N, H] (x's dtype); combined_topk_weights [N, K] (topk_weights' dtype) or None; event."""

    combined_x: torch.Tensor
    combined_topk_weights: torch.Tensor | None
    event: EventOverlap


@dataclass(frozen=True)
class _Options:
    config: Config | None
    previous_event: EventOverlap | None
    async_finish: bool
    allocate_on_comm_stream: bool

    def comm_kwargs(self, buffer: Buffer, previous_event: EventOverlap | None = None) -> dict[str, Any]:
        """Buffer keyword arguments; with async_finish, work is ordered after `previous_event` or "now"."""
        event = previous_event if previous_event is not None else self.previous_event
        if self.async_finish and event is None:
            event = buffer.capture()  # what Megatron does: allocate_on_comm_stream needs an event
        return dict(
            previous_event=event,
            async_finish=self.async_finish,
            allocate_on_comm_stream=self.allocate_on_comm_stream,
        )

    def backward_kwargs(self, buffer: Buffer) -> dict[str, Any]:
        if not self.async_finish:
            return {}
        return dict(
            previous_event=buffer.capture(), async_finish=True, allocate_on_comm_stream=self.allocate_on_comm_stream
        )


class _GradSafeEvent(EventOverlap):
    """An EventOverlap whose wait fills autograd-tracked outputs with autograd off, then runs `after`."""

    def __init__(self, inner: EventOverlap, after: list[Callable[[], None]]) -> None:
        super().__init__(inner.event, inner.extra_tensors)
        self._after = after

    def current_stream_wait(self) -> None:
        with torch.no_grad():
            super().current_stream_wait()
            after, self._after = self._after, []
            for step in after:
                step()

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.current_stream_wait()


def _finish(event: EventOverlap, options: _Options, after: list[Callable[[], None]]) -> EventOverlap:
    """Return the caller's event (async) or complete now; `after` runs once the data are there."""
    if options.async_finish:
        return _GradSafeEvent(event, after)
    for step in after:
        step()
    return event


class _Box:
    """Carries a Function's non-tensor results (handle, counts, event) out of `apply`."""

    handle: Any = None
    counts: Any = None
    event: Any = None


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_idx: torch.Tensor,
        buffer: Buffer,
        num_experts: int,
        expert_alignment: int,
        num_worst_tokens: int,
        options: _Options,
        box: _Box,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        native = topk_weights.dtype == torch.float32
        with _rejected_as(buffer, "dispatch"):  # the layout checks the ids on this rank alone
            per_rank, per_rdma, per_expert, in_rank, layout_event = buffer.get_dispatch_layout(
                topk_idx, num_experts, **options.comm_kwargs(buffer)
            )
        recv, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
            x if native else (x, topk_weights),
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights if native else topk_weights.float(),
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
            config=options.config,
            **options.comm_kwargs(buffer, layout_event if options.async_finish else None),
        )
        # Which received pairs are local, copied out of recv_topk_idx once it is filled (at the event's wait when
        # async): the caller owns recv_topk_idx and may rewrite it in place (say -1 -> an overflow bucket).
        local = torch.empty(recv_idx.shape, dtype=torch.bool, device=recv_idx.device)
        fill_local = run_once(lambda: torch.ge(recv_idx, 0, out=local))
        after: list[Callable[[], None]] = [fill_local]
        if native:
            recv_x = recv
        else:  # the exact weights arrived whole; keep only the local pairs, as dispatch does
            recv_x, recv_w = recv
            after.append(lambda: recv_w.masked_fill_(~local, 0))
        box.handle, box.counts, box.event = handle, counts, _finish(event, options, after)
        ctx.buffer, ctx.handle, ctx.options, ctx.native = buffer, handle, options, native
        ctx.local, ctx.fill_local = local, fill_local
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_recv_x: torch.Tensor, _grad_idx: Any, grad_recv_w: torch.Tensor) -> tuple[Any, ...]:
        buffer: Buffer = ctx.buffer
        # Usually done already; an async dispatch whose event was never waited on completes (and masks) here.
        ctx.handle.complete()
        ctx.fill_local()
        grad_recv_x = _dense(grad_recv_x)
        grad_recv_w = _dense(grad_recv_w.masked_fill(~ctx.local, 0))
        kwargs = ctx.options.backward_kwargs(buffer)
        if ctx.native:
            grad_x, grad_w, event = buffer.combine(grad_recv_x, ctx.handle, topk_weights=grad_recv_w, **kwargs)
            event.current_stream_wait()
        else:
            grad_x, _, event = buffer.combine(grad_recv_x, ctx.handle, **kwargs)
            event.current_stream_wait()
            grad_w, _, event = buffer.combine(grad_recv_w, ctx.handle, **ctx.options.backward_kwargs(buffer))
            event.current_stream_wait()
        return grad_x, grad_w, None, None, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        topk_weights: torch.Tensor | None,
        bias_0: torch.Tensor | None,
        bias_1: torch.Tensor | None,
        buffer: Buffer,
        handle: tuple,
        options: _Options,
        box: _Box,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        native = topk_weights is None or topk_weights.dtype == torch.float32
        bias = tuple(b for b in (bias_0, bias_1) if b is not None)
        if not native:
            # Two combines follow where a rank with float32 weights (or none) makes one: announce them, so that
            # a rank on the other path fails this call with every rank instead of pairing with its next one.
            buffer._agree("combine_weights_apart", weights_dtype=dtype_code(topk_weights.dtype))
        combined_x, combined_w, event = buffer.combine(
            x,
            handle,
            topk_weights=topk_weights if native else None,
            bias=bias or None,
            config=options.config,
            **options.comm_kwargs(buffer),
        )
        if not native:  # exact weights: their own combine, summed in their dtype
            event.current_stream_wait()
            combined_w, _, event = buffer.combine(topk_weights, handle, config=options.config)
        box.event = _finish(event, options, [])
        ctx.buffer, ctx.handle, ctx.options = buffer, handle, options
        ctx.has_weights = topk_weights is not None
        ctx.bias_dtypes = (None if bias_0 is None else bias_0.dtype, None if bias_1 is None else bias_1.dtype)
        return combined_x, combined_w

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_x: torch.Tensor, grad_w: torch.Tensor | None) -> tuple[Any, ...]:
        buffer: Buffer = ctx.buffer
        handle = ctx.handle
        grad_x = _dense(grad_x)
        grad_w = None if grad_w is None else _dense(grad_w)
        send: Any = grad_x
        if ctx.has_weights:  # one cached dispatch carries both gradients (weights in the scales slot)
            send = (grad_x, grad_w)
        recv, _, _, _, _, event = buffer.dispatch(send, handle=handle, **ctx.options.backward_kwargs(buffer))
        event.current_stream_wait()
        recv_x, recv_w = recv if ctx.has_weights else (recv, None)
        if handle.num_worst_tokens:  # padding rows were never read by combine: their gradient is 0
            real = (handle[3] >= 0).unsqueeze(1)
            recv_x = recv_x.masked_fill(~real, 0)
            recv_w = None if recv_w is None else recv_w.masked_fill(~real, 0)
        grad_bias = [None if dtype is None else grad_x.to(dtype) for dtype in ctx.bias_dtypes]
        return recv_x, recv_w, grad_bias[0], grad_bias[1], None, None, None, None


def dispatch(
    buffer: Buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    *,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
    config: Config | None = None,
    previous_event: EventOverlap | None = None,
    async_finish: bool = False,
    allocate_on_comm_stream: bool = False,
) -> DispatchResult:
    """Differentiable normal-mode dispatch: layout and dispatch forward, combine backward (SPEC 3-5).

    Arguments:
        buffer: the group's `deep_ep.Buffer` (normal mode).
        x: [N, H] float (bf16, fp16, fp32; fp64 with the reference backend). Differentiable.
        topk_idx: int64 (or int32) [N, K], -1 = no expert. Not differentiable.
        topk_weights: float32 [N, K] (DeepEP's wire format; float64 travels exactly too). Differentiable.
        num_experts: E, divisible by the group size.
        expert_alignment, num_worst_tokens, config: as `Buffer.dispatch`.
        previous_event / async_finish / allocate_on_comm_stream: as `Buffer.dispatch`; with async_finish the
            outputs are valid after `result.event.current_stream_wait()`.
    Returns:
        DispatchResult(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle,
        event). Backward: grad_x [N, H] = combine of grad_recv_x (fp32 sum over destination ranks ascending,
        one rounding to x's dtype); grad_topk_weights [N, K] = the gradient of the one rank where each pair
        is local.
    """
    if not isinstance(buffer, Buffer):
        raise TypeError(f"buffer must be a deep_ep.Buffer, got {type(buffer).__name__}")
    with _rejected_as(buffer, "dispatch"):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor [N, H] (fp8 tuples are not differentiable), got {type(x).__name__}")
        if not isinstance(topk_weights, torch.Tensor) or not topk_weights.is_floating_point():
            raise TypeError(f"topk_weights must be a floating-point tensor [N, K], got {_describe(topk_weights)}")
        if not isinstance(topk_idx, torch.Tensor):
            raise TypeError(f"topk_idx must be an int64 tensor [N, K], got {type(topk_idx).__name__}")
        if topk_weights.shape != topk_idx.shape:
            shapes = f"{list(topk_weights.shape)} but topk_idx has {list(topk_idx.shape)}"
            raise ValueError(f"topk_weights has shape {shapes}")
        # Backward combines their gradients: a dtype combine refuses would pass forward and fail in backward.
        _check_combinable(buffer, "x", x, "its gradient")
        if topk_weights.dtype != torch.float32:
            _check_combinable(buffer, "topk_weights", topk_weights, "its gradient")
    options = _Options(config, previous_event, async_finish, allocate_on_comm_stream)
    box = _Box()
    recv_x, recv_idx, recv_w = _Dispatch.apply(
        x, topk_weights, topk_idx, buffer, num_experts, expert_alignment, num_worst_tokens, options, box
    )
    return DispatchResult(recv_x, recv_idx, recv_w, box.counts, box.handle, box.event)


def combine(
    buffer: Buffer,
    x: torch.Tensor,
    handle: tuple,
    *,
    topk_weights: torch.Tensor | None = None,
    bias: torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    config: Config | None = None,
    previous_event: EventOverlap | None = None,
    async_finish: bool = False,
    allocate_on_comm_stream: bool = False,
) -> CombineResult:
    """Differentiable normal-mode combine: combine forward, cached dispatch backward (SPEC 4-5).

    Arguments:
        buffer: the Buffer whose dispatch made `handle`.
        x: [num_recv, H] bf16 (reference backend: also fp16, fp32, fp64), row i = row i of the dispatch's
            recv_x; already weighted and summed per row (see `deep_ep.permute.unpermute`). Differentiable.
        handle: the dispatch's handle (`DispatchResult.handle`).
        topk_weights: optional float32 [num_recv, K] (float64 travels exactly too), summed like x.
        bias: None, a tensor, or a pair, each [N, H] of x's dtype, added first. Differentiable.
        config, previous_event, async_finish, allocate_on_comm_stream: as `Buffer.combine`.
    Returns:
        CombineResult(combined_x [N, H], combined_topk_weights [N, K] or None, event). Backward:
        grad_x = cached dispatch of grad_combined_x (padding rows of a num_worst_tokens dispatch get 0),
        grad_bias = grad_combined_x.
    """
    if not isinstance(buffer, Buffer):
        raise TypeError(f"buffer must be a deep_ep.Buffer, got {type(buffer).__name__}")
    with _rejected_as(buffer, "combine"):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor [num_recv, H], got {type(x).__name__}")
        if topk_weights is not None and (
            not isinstance(topk_weights, torch.Tensor) or not topk_weights.is_floating_point()
        ):
            raise TypeError(f"topk_weights must be None or a floating-point tensor, got {_describe(topk_weights)}")
        if topk_weights is not None and topk_weights.dtype != torch.float32:
            # Such weights travel as the x of a combine of their own, whose checks would call them x.
            _check_combinable(buffer, "topk_weights", topk_weights, "it")
            if topk_weights.dim() != 2 or topk_weights.shape[0] != x.shape[0]:
                raise ValueError(f"topk_weights must be [{x.shape[0]}, K] (x's rows), got {list(topk_weights.shape)}")
        if bias is None:
            biases: tuple[Any, Any] = (None, None)
        elif isinstance(bias, torch.Tensor):
            biases = (bias, None)
        elif isinstance(bias, (tuple, list)) and len(bias) == 2:
            biases = (bias[0], bias[1])
        else:
            raise TypeError(f"bias must be None, a tensor, or a pair, got {type(bias).__name__}")
    options = _Options(config, previous_event, async_finish, allocate_on_comm_stream)
    box = _Box()
    combined_x, combined_w = _Combine.apply(x, topk_weights, biases[0], biases[1], buffer, handle, options, box)
    return CombineResult(combined_x, combined_w, box.event)


@contextlib.contextmanager
def _rejected_as(buffer: Buffer, op: str) -> Iterator[None]:
    """Checks made on this rank before the Buffer's `op`: one that fails still takes part in `op`'s agreement
    (a rejected row), so the peers raise in their `op` too instead of waiting for this rank."""
    try:
        yield
    except Exception:
        buffer._reject(op)
        raise


def _check_combinable(buffer: Buffer, name: str, tensor: torch.Tensor, what: str) -> None:
    """Refuse, before any communication, a tensor whose dtype the Buffer's combine (which carries `what`) refuses."""
    dtypes = buffer.runtime_combine_dtypes()
    if tensor.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {tensor.dtype}, but combine carries {what} and takes {names}")


def _dense(grad: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a gradient that may be expanded (stride 0), also when it has no rows."""
    if grad.numel() == 0:  # .contiguous() keeps the zero strides of an empty expanded tensor
        return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    return grad.contiguous()


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__
