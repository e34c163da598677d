"""deep_ep: DeepEP's expert-parallel dispatch/combine API over pluggable backends.

`Buffer(group, backend="auto")` picks the fastest available backend for the group's device, else the
pure torch.distributed `reference` backend, which defines the semantics (see docs/SEMANTICS.md).
"""

from __future__ import annotations

from . import autograd, moe, permute  # noqa: F401 - training helpers (docs/TRAINING.md), cheap to import
from .backends import list_backends, register_backend
from .buffer import Buffer
from .config import Config, topk_idx_t
from .errors import (
    BackendUnavailableError,
    CollectiveMismatchError,
    CommTimeoutError,
    DeepEPError,
    UnsupportedFeatureError,
)
from .utils import EventHandle, EventOverlap

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "Config",
    "EventOverlap",
    "EventHandle",
    "topk_idx_t",
    "list_backends",
    "register_backend",
    "DeepEPError",
    "BackendUnavailableError",
    "UnsupportedFeatureError",
    "CollectiveMismatchError",
    "CommTimeoutError",
]
