"""Handles returned by dispatch: DeepEP's tuples, plus the owner and the backend's private route.

User code may index a handle as DeepEP documents (`handle[0]` is `rank_prefix_matrix`, `handle[3]` is
`recv_src_idx`); the façade uses `owner` to reject a handle from another Buffer or of the other mode.
"""

from __future__ import annotations

from typing import Any


class DispatchHandle(tuple):
    """(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
    is_token_in_rank, send_head): DeepEP's intranode handle order (SPEC section 4)."""

    owner: int
    route: Any
    num_worst_tokens: int

    def __new__(cls, items: tuple, owner: int, route: Any, num_worst_tokens: int) -> DispatchHandle:
        handle = super().__new__(cls, items)
        handle.owner, handle.route, handle.num_worst_tokens = owner, route, num_worst_tokens
        return handle


class LowLatencyHandle(tuple):
    """(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts) (SPEC section 6)."""

    owner: int
    route: Any
    num_topk: int

    def __new__(cls, items: tuple, owner: int, route: Any, num_topk: int) -> LowLatencyHandle:
        handle = super().__new__(cls, items)
        handle.owner, handle.route, handle.num_topk = owner, route, num_topk
        return handle
