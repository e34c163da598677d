"""EMULATION of the torch_npu API the Ascend backend uses, for tests on machines without an NPU.

`install(chip)` puts a fake `torch_npu` module into `sys.modules` (the fused MoE ops of `ops.py`, bound
against the torch-npu 2.14.0 schemas of `schemas.py`, plus `npu.get_device_name()`), and points the
backend's vendor seam (`deep_ep.backends.ascend.vendor`) at gloo groups named as HCCL communicators. The
backend then runs its real code path on CPU tensors. Call it inside a test process only (for example at
the top of a `run_ranks` rank function); `uninstall()` undoes it.

Every result obtained this way depends on the emulation: it shows the backend drives the documented API
correctly and converts what the documentation says the ops return, not what an NPU actually does.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ...backends.ascend import Vendor
from . import ops
from .ops import EmulatedOpError, EmulationState
from .schemas import SCHEMAS

__all__ = ["EmulatedOpError", "EmulationState", "install", "uninstall", "bind_schema", "DEVICE_NAMES"]

DEVICE_NAMES = {"A2": "Ascend910B3", "A3": "Ascend910_9392"}  # names torch_npu reports for these chips
_saved: dict[str, Any] = {}

_PY_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "str": (str,), "float": (float, int), "bool": (bool,)}


def _type_ok(type_name: str, value: Any) -> bool:
    # torch prints "Tensor?" as "Optional[Tensor]"; accept both spellings.
    optional = type_name.endswith("?") or type_name.startswith("Optional[")
    base = type_name.removeprefix("Optional[").removesuffix("]").rstrip("?")
    if value is None:
        return optional
    if base == "Tensor":
        return isinstance(value, torch.Tensor)
    if base == "int" and isinstance(value, bool):
        return False
    return isinstance(value, _PY_TYPES.get(base, (object,)))


def bind_schema(schema: str, impl: Callable[[dict[str, Any]], Any], record: list | None = None) -> Callable:
    """A Python callable that binds its arguments as the registered op would: positional arguments in
    order, keyword-only ones by keyword, unknown keywords and wrong types rejected (TypeError), defaults
    filled from the schema; then `impl(arguments)` runs. Calls are appended to `record` when given."""
    parsed = torch._C.parse_schema(schema)
    arguments = list(parsed.arguments)
    names = [argument.name for argument in arguments]

    def op(*args: Any, **kwargs: Any) -> Any:
        positional = [argument for argument in arguments if not argument.kwarg_only]
        if len(args) > len(positional):
            raise TypeError(f"{parsed.name}() takes {len(positional)} positional arguments, got {len(args)}")
        bound: dict[str, Any] = {argument.name: value for argument, value in zip(positional, args)}
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{parsed.name}() got an unexpected keyword argument {key!r}")
            if key in bound:
                raise TypeError(f"{parsed.name}() got multiple values for argument {key!r}")
            bound[key] = value
        for argument in arguments:
            if argument.name not in bound:
                if not argument.has_default_value():
                    raise TypeError(f"{parsed.name}() missing required argument {argument.name!r}")
                bound[argument.name] = argument.default_value
            if not _type_ok(str(argument.type), bound[argument.name]):
                raise TypeError(
                    f"{parsed.name}(): argument {argument.name!r} must be {argument.type}, "
                    f"got {type(bound[argument.name]).__name__}"
                )
        if record is not None:
            record.append((parsed.name, {"args": len(args), "kwargs": dict(kwargs)}))
        return impl(bound)

    params = []
    for argument in arguments:
        kind = inspect.Parameter.KEYWORD_ONLY if argument.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        default = argument.default_value if argument.has_default_value() else inspect.Parameter.empty
        params.append(inspect.Parameter(argument.name, kind, default=default))
    op.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    op.__name__ = parsed.name
    op.__doc__ = f"EMULATION of torch_npu.{parsed.name} (torch-npu 2.14.0 schema)."
    return op


def _fake_module(state: EmulationState, generations: tuple[str, ...]) -> types.ModuleType:
    module = types.ModuleType("torch_npu")
    module.__doc__ = "EMULATION of torch_npu for deep_ep tests (deep_ep.testing.npu_emulation); not the real package."
    module.__version__ = torch.__version__.split("+")[0]
    module.__deep_ep_emulation__ = state
    module.npu = types.SimpleNamespace(get_device_name=lambda device=None: state.device_name)
    for generation in generations:
        suffix = "_v2" if generation == "v2" else ""
        for kind, impl in (("dispatch", ops.dispatch), ("combine", ops.combine)):
            name = f"npu_moe_distribute_{kind}{suffix}"
            bound = bind_schema(
                SCHEMAS[name], lambda a, impl=impl, generation=generation: impl(state, generation, a), state.calls
            )
            setattr(module, name, bound)
    return module


def install(chip: str = "A3", *, generations: tuple[str, ...] = ("v2", "v1"), relax_world_size: bool = False):
    """Install the EMULATION in this process and return its `EmulationState` (records op calls).

    chip: "A2" or "A3" (what `torch_npu.npu.get_device_name()` reports). generations: which op families
    exist ("v1" alone emulates a torch_npu without the v2 ops). relax_world_size: let the A2 ops accept
    any group size >= 2 (the real A2 ops need 16 or more ranks) in both the emulated ops and the backend's
    support matrix, so the A2 code path can run on a few local processes.
    """
    from ...backends import ascend

    if chip not in DEVICE_NAMES:
        raise ValueError(f"chip must be one of {sorted(DEVICE_NAMES)}, got {chip!r}")
    uninstall()
    state = EmulationState(chip=chip, device_name=DEVICE_NAMES[chip], relax_world_size=relax_world_size)
    _saved["module"] = sys.modules.get("torch_npu")
    _saved["vendor"] = ascend.vendor
    _saved["device_types"] = ascend.AscendBackend.device_types
    _saved["matrix"] = dict(ascend.SUPPORT_MATRIX)
    sys.modules["torch_npu"] = _fake_module(state, generations)
    ascend.vendor = EmulatedVendor(state)
    ascend.AscendBackend.device_types = ("npu", "cpu")  # the emulated "NPU" tensors are CPU tensors
    if relax_world_size:
        for key, limits in list(ascend.SUPPORT_MATRIX.items()):
            if key[0] == "A2":
                ascend.SUPPORT_MATRIX[key] = dataclasses.replace(limits, world_range=(2, max(limits.world_sizes)))
    return state


def uninstall() -> None:
    """Undo `install` (a no-op when nothing is installed)."""
    if not _saved:
        return
    from ...backends import ascend

    if _saved["module"] is None:
        sys.modules.pop("torch_npu", None)
    else:
        sys.modules["torch_npu"] = _saved["module"]
    ascend.vendor = _saved["vendor"]
    ascend.AscendBackend.device_types = _saved["device_types"]
    ascend.SUPPORT_MATRIX.clear()
    ascend.SUPPORT_MATRIX.update(_saved["matrix"])
    _saved.clear()


class EmulatedVendor(Vendor):
    """The backend's vendor seam for the EMULATION: gloo groups play HCCL groups, named in the registry."""

    def __init__(self, state: EmulationState) -> None:
        self.state = state

    def group_backend(self, group: dist.ProcessGroup) -> str:
        return "hccl"  # EMULATION: a gloo group stands in for an HCCL one

    def hccl_comm_name(self, group: dist.ProcessGroup) -> str:
        for name, known in self.state.comms.items():
            if known is group:
                return name
        name = f"emulated_hccl_comm_{len(self.state.comms)}"
        self.state.comms[name] = group
        return name
