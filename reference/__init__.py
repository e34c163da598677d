"""Executable spec of deep_ep: SPEC sections 3-6 as single-process functions over every rank's inputs.

Each function takes lists indexed by rank (all ranks' inputs at once) and returns lists indexed by rank,
with no torch.distributed and no code shared with the `deep_ep` package. Backends are tested against it
bit for bit (SPEC section 9). Written to be read; it runs on tiny CPU shapes only.
"""

from __future__ import annotations

from .casts import fp8_cast, int8_cast
from .low_latency import low_latency_combine, low_latency_dispatch
from .normal import cached_dispatch, channel_range, combine, dispatch, layout

__all__ = [
    "cached_dispatch",
    "channel_range",
    "combine",
    "dispatch",
    "fp8_cast",
    "int8_cast",
    "layout",
    "low_latency_combine",
    "low_latency_dispatch",
]
