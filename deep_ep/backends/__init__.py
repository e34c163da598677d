"""Backend registry: names -> backend classes, imported only when asked for.

Built-ins are listed here by import path; third-party backends register through the entry-point group
`deep_ep.backends` (value "package.module:Class") or `register_backend`. `"auto"` (or the environment
variable `DEEP_EP_BACKEND`) picks the available backend of highest priority; an explicit name never
falls back to another backend.
"""

from __future__ import annotations

import importlib
import os
from importlib import metadata

import torch
import torch.distributed as dist

from ..errors import BackendUnavailableError
from .base import Backend

_BUILTIN = {
    "reference": "deep_ep.backends.reference:ReferenceBackend",
    "ascend": "deep_ep.backends.ascend:AscendBackend",
    "cuda": "deep_ep.backends.cuda:CudaBackend",
}
_registry: dict[str, str | type[Backend]] = dict(_BUILTIN)
_entry_points_loaded = False


def register_backend(name: str, target: str | type[Backend]) -> None:
    """Register a backend class (or its "module:Class" path) under `name`; a later registration wins."""
    if not name or name == "auto":
        raise ValueError(f"backend name {name!r} is reserved or empty")
    _registry[name] = target


def unregister_backend(name: str) -> None:
    """Remove a backend registered at run time (built-ins come back with their defaults)."""
    _registry.pop(name, None)
    if name in _BUILTIN:
        _registry[name] = _BUILTIN[name]


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in metadata.entry_points(group="deep_ep.backends"):
        _registry.setdefault(entry.name, entry.value)


def list_backends() -> list[str]:
    """Names of every registered backend (built-in, entry points, run-time registrations)."""
    _load_entry_points()
    return sorted(_registry)


def get_backend_class(name: str) -> type[Backend]:
    """The class registered as `name`; ValueError listing the registered names if there is none."""
    _load_entry_points()
    if name not in _registry:
        raise ValueError(f"unknown backend {name!r}; registered backends: {', '.join(list_backends())}")
    target = _registry[name]
    if isinstance(target, str):
        module_name, _, class_name = target.partition(":")
        target = getattr(importlib.import_module(module_name), class_name)
        _registry[name] = target
    return target


def unavailable_reason(name: str, group: dist.ProcessGroup, device: torch.device) -> str | None:
    """Why backend `name` cannot serve `group` on `device`, or None if it can. Never raises for a known name."""
    try:
        cls = get_backend_class(name)
    except ImportError as error:
        return f"backend {name!r} could not be imported: {error}"
    if device.type not in cls.device_types:
        return f"backend {name!r} serves devices {list(cls.device_types)}, not {device.type!r}"
    try:
        return cls.unavailable_reason(group, device)
    except Exception as error:  # a broken probe must not break "auto"
        return f"availability check of backend {name!r} failed: {error!r}"


def availability(group: dist.ProcessGroup, device: torch.device) -> dict[str, str | None]:
    """Every registered backend's unavailability reason (None = available) for this group and device."""
    return {name: unavailable_reason(name, group, device) for name in list_backends()}


def select_backend(name: str, group: dist.ProcessGroup, device: torch.device) -> type[Backend]:
    """Resolve `name` ("auto" or a registered name) to a class that can serve `group` on `device`."""
    if name == "auto":
        name = os.environ.get("DEEP_EP_BACKEND", "auto") or "auto"
    if name != "auto":
        reason = unavailable_reason(name, group, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
        return get_backend_class(name)
    candidates = []
    for candidate in list_backends():
        if unavailable_reason(candidate, group, device) is None:
            cls = get_backend_class(candidate)
            candidates.append((cls.priority, candidate != "reference", cls))
    if not candidates:
        return get_backend_class("reference")
    return max(candidates, key=lambda item: item[:2])[2]
