"""Handles returned by dispatch: DeepEP's tuples, plus the owner and the backend's private route.

User code may index a handle as DeepEP documents (`handle[0]` is `rank_prefix_matrix`, `handle[3]` is
`recv_src_idx`); the façade uses `owner` to reject a handle from another Buffer or of the other mode, and
`serial` (the how-manieth dispatch of its Buffer made it, the same on every rank) to check that every rank
passes the same dispatch's handle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _nothing() -> None:
    pass


class DispatchHandle(tuple):
    """(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
    is_token_in_rank, send_head): DeepEP's intranode handle order (SPEC section 4)."""

    owner: int
    serial: int
    route: Any
    num_worst_tokens: int
    complete: Callable[[], None] = _nothing  # finishes the dispatch (idempotent) before a call reads the route

    def __new__(cls, items: tuple, owner: int, serial: int, route: Any, num_worst_tokens: int) -> DispatchHandle:
        handle = super().__new__(cls, items)
        handle.owner, handle.serial, handle.route, handle.num_worst_tokens = owner, serial, route, num_worst_tokens
        return handle


class LowLatencyHandle(tuple):
    """(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts) (SPEC section 6)."""

    owner: int
    serial: int
    route: Any
    num_topk: int
    complete: Callable[[], None] = _nothing  # the dispatch's receive (idempotent), before a call reads the route

    def __new__(cls, items: tuple, owner: int, serial: int, route: Any, num_topk: int) -> LowLatencyHandle:
        handle = super().__new__(cls, items)
        handle.owner, handle.serial, handle.route, handle.num_topk = owner, serial, route, num_topk
        return handle
