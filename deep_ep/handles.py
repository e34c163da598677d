"""Handles returned by dispatch: DeepEP's tuples, plus the owner and the backend's private route.

User code may index a handle as DeepEP documents (`handle[0]` is `rank_prefix_matrix`, `handle[3]` is
`recv_src_idx`); the façade uses `owner` to reject a handle from another Buffer or of the other mode, and
`serial` (the how-manieth dispatch of its Buffer made it, the same on every rank) to check that every rank
passes the same dispatch's handle.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any


def _nothing() -> None:
    pass


class _Handle(tuple):
    """A tuple of DeepEP's items with the attributes named in `_attributes` beside them."""

    _attributes: tuple[str, ...] = ()
    owner: int
    serial: int
    route: Any
    complete: Callable[[], None] = _nothing  # finishes the dispatch (idempotent) before a call reads the route

    def __new__(cls, items: tuple, *attributes: Any) -> _Handle:
        handle = super().__new__(cls, items)
        for name, value in zip(cls._attributes, attributes, strict=True):
            setattr(handle, name, value)
        return handle

    def __copy__(self) -> _Handle:
        return self  # immutable, as a tuple's copy is

    def __deepcopy__(self, memo: dict) -> _Handle:
        # DeepEP's handle is a plain tuple, deep-copied item by item; what ties it to its Buffer and its
        # dispatch (owner, serial, route) stays shared, so the copy works wherever the original does.
        twin = type(self)(copy.deepcopy(tuple(self), memo), *(getattr(self, name) for name in self._attributes))
        twin.complete = self.complete
        return twin

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"a {type(self).__name__} belongs to the Buffer that made it and cannot be pickled")


class DispatchHandle(_Handle):
    """(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
    is_token_in_rank, send_head): DeepEP's intranode handle order (SPEC section 4)."""

    _attributes = ("owner", "serial", "route", "num_worst_tokens")
    num_worst_tokens: int


class LowLatencyHandle(_Handle):
    """(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts) (SPEC section 6)."""

    _attributes = ("owner", "serial", "route", "num_tokens", "num_topk", "dispatched_ids")
    num_tokens: int
    num_topk: int
    dispatched_ids: Any  # the dispatch's topk_idx on the host where its values were checked, else None
