"""Exception types raised by deep_ep (SPEC section 8)."""

from __future__ import annotations


class DeepEPError(Exception):
    """Base class of deep_ep's own exceptions."""


class BackendUnavailableError(DeepEPError, RuntimeError):
    """An explicitly named backend cannot serve this group or device; the message says why."""


class UnsupportedFeatureError(DeepEPError, NotImplementedError):
    """A DeepEP feature that this build does not provide (never silently ignored)."""


class CollectiveMismatchError(DeepEPError, ValueError):
    """Ranks called a collective operation with arguments that must agree but do not.

    Raised on every rank of the group, with what each rank passed, instead of hanging.
    """


class CommTimeoutError(DeepEPError, TimeoutError):
    """A peer did not answer an operation within the configured timeout."""
