# ruff: noqa: UP006, UP007, UP035, UP045, E501 - user code as DeepEP users write it
"""The user code of shared/seeds/003 (DeepEP's README example for training / prefill), unchanged in
substance: it must run on deep_ep as written for DeepEP."""

from __future__ import annotations

from typing import List, Optional, Tuple, Union  # noqa: UP035 - kept as user code writes it

import torch
import torch.distributed as dist

from deep_ep import Buffer, EventOverlap

_buffer: Optional[Buffer] = None  # noqa: UP045


def get_hidden_bytes(x: torch.Tensor) -> int:
    t = x[0] if isinstance(x, tuple) else x
    return t.size(1) * max(t.element_size(), 2)


def get_buffer(group: dist.ProcessGroup, hidden_bytes: int) -> Buffer:
    global _buffer
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    if (
        _buffer is None
        or _buffer.group != group
        or _buffer.num_nvl_bytes < num_nvl_bytes
        or _buffer.num_rdma_bytes < num_rdma_bytes
    ):
        _buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes)
    return _buffer


def dispatch_forward(
    x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],  # noqa: UP006, UP007
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    previous_event: Optional[EventOverlap] = None,  # noqa: UP045
) -> Tuple[
    Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor, List, Tuple, EventOverlap
]:  # noqa: E501, UP006, UP007
    global _buffer
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = (
        _buffer.get_dispatch_layout(
            topk_idx,
            num_experts,
            previous_event=previous_event,
            async_finish=True,
            allocate_on_comm_stream=previous_event is not None,
        )
    )
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = _buffer.dispatch(
        x,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        previous_event=previous_event,
        async_finish=True,
        allocate_on_comm_stream=True,
    )
    return recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event


def dispatch_backward(
    grad_recv_x: torch.Tensor,
    grad_recv_topk_weights: torch.Tensor,
    handle: Tuple,  # noqa: UP006
) -> Tuple[torch.Tensor, torch.Tensor, EventOverlap]:  # noqa: UP006
    global _buffer
    combined_grad_x, combined_grad_recv_topk_weights, event = _buffer.combine(
        grad_recv_x, handle, topk_weights=grad_recv_topk_weights, async_finish=True
    )
    return combined_grad_x, combined_grad_recv_topk_weights, event


def combine_forward(
    x: torch.Tensor,
    handle: Tuple,
    previous_event: Optional[EventOverlap] = None,  # noqa: UP006, UP045
) -> Tuple[torch.Tensor, EventOverlap]:  # noqa: UP006
    global _buffer
    combined_x, _, event = _buffer.combine(
        x, handle, async_finish=True, previous_event=previous_event, allocate_on_comm_stream=previous_event is not None
    )
    return combined_x, event


def combine_backward(
    grad_combined_x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],  # noqa: UP006, UP007
    handle: Tuple,  # noqa: UP006
    previous_event: Optional[EventOverlap] = None,  # noqa: UP045
) -> Tuple[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], EventOverlap]:  # noqa: UP006, UP007
    global _buffer
    grad_x, _, _, _, _, event = _buffer.dispatch(
        grad_combined_x,
        handle=handle,
        async_finish=True,
        previous_event=previous_event,
        allocate_on_comm_stream=previous_event is not None,
    )
    return grad_x, event
