"""Argument checks shared by the façade's methods: each error names the argument, its value and the rule."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import torch


def tensor(
    name: str,
    value: Any,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    dim: int | tuple[int, ...] | None = None,
    shape: tuple[int | None, ...] | None = None,
    device: torch.device | None = None,
    written: bool = False,
) -> torch.Tensor:
    """`value` as a checked tensor; `None` entries of `shape` match any size. `written`: the call writes into it
    (an output or a counter), so it must take in-place writes: checked here, before any communication, instead of
    failing in torch's write after the exchange."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}: call .to_dense() first")
    if value.is_conj() or value.is_neg():
        raise TypeError(f"{name} is a lazy conjugate or negative view: call .resolve_conj().resolve_neg() first")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {value.dtype}")
    dims = (dim,) if isinstance(dim, int) else dim
    if shape is not None:
        dims = (len(shape),)
    if dims is not None and value.dim() not in dims:
        raise ValueError(f"{name} must be {' or '.join(f'{d}-D' for d in dims)}, got shape {list(value.shape)}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, value.shape)):
            if want is not None and want != got:
                expected = ["*" if s is None else s for s in shape]
                raise ValueError(f"{name} must have shape {expected}, got {list(value.shape)} (dimension {axis})")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device}, but the other inputs are on {device}")
    if written and value.requires_grad:
        raise ValueError(f"{name} is written in place, so it must not require grad")
    if written and any(stride == 0 and size > 1 for size, stride in zip(value.shape, value.stride())):
        raise ValueError(
            f"{name} is written in place, so its elements must not share memory (shape {list(value.shape)}, strides "
            f"{list(value.stride())}: an expanded tensor?)"
        )
    return value


def integer(name: str, value: Any, *, minimum: int | None = None) -> int:
    """`value` as a Python int, at least `minimum`. Int-like objects (numpy integers) are taken, as DeepEP's C++
    bindings take them; bools, floats and strings are refused."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def flag(name: str, value: Any) -> bool:
    """`value` as a bool: a bool, a numpy bool, or the int 0 or 1. Anything else (a string, None, 2) is refused
    instead of being read by its truth: `use_fp8="no"` or `async_finish="False"` would silently mean True."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    if not isinstance(value, (str, bytes)):
        try:
            number = operator.index(value)
        except TypeError:
            number = None
        if number in (0, 1):
            return bool(number)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def flags(**named: Any) -> None:
    """`flag` for each keyword argument (by its name)."""
    for name, value in named.items():
        flag(name, value)


# The longest timeout taken (about 11.6 days): every wait turns it into a `datetime.timedelta`, and the GPU barrier
# into whole milliseconds of a 32-bit count; an infinite or larger one would fail there, after the call was issued.
MAX_TIMEOUT_S = 1e6


def seconds(name: str, value: Any) -> float:
    """`value` as a timeout in seconds: a real number in (0, MAX_TIMEOUT_S]; bools, strings, NaN and infinities
    are refused (here, before any call waits with it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        raise ValueError(f"{name}={value!r} must be a finite number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    return value


def expert_id_values(name: str, value: torch.Tensor, num_experts: int, distinct: bool) -> torch.Tensor:
    """`expert_ids` and (when `distinct`) `distinct_experts`, on one host copy of `value`: a device tensor is read
    once, and the checks run as a few CPU operations instead of a dozen device kernels and two round trips.
    Returns that host copy."""
    host = value.cpu()
    expert_ids(name, host, num_experts)
    if distinct:
        distinct_experts(name, host)
    return host


def same_ids(name: str, value: torch.Tensor, dispatched: torch.Tensor) -> None:
    """Every entry equals the dispatch's (host tensors of one shape)."""
    differ = value != dispatched
    if bool(differ.any()):
        index = tuple(int(i) for i in differ.nonzero()[0])
        raise ValueError(
            f"{name}{list(index)} = {int(value[index])} but the handle's dispatch sent {int(dispatched[index])} "
            "there: pass the dispatched topk_idx"
        )


def expert_ids(name: str, value: torch.Tensor, num_experts: int) -> None:
    """Every entry is -1 (no expert) or in [0, num_experts)."""
    if value.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(value)).tolist()  # one read of the device, two numbers
    if low >= -1 and high < num_experts:
        return
    bad = (value < -1) | (value >= num_experts)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}{list(index)} = {int(value[index])} is not an expert id: entries must be -1 or in "
            f"[0, num_experts={num_experts})"
        )


def distinct_experts(name: str, value: torch.Tensor) -> None:
    """No token selects the same expert twice (DeepEP assumes distinct top-k experts)."""
    if value.shape[0] == 0 or value.shape[1] < 2:
        return
    ordered = value.sort(dim=1).values
    same = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(same.any()):
        token = int(same.any(1).nonzero()[0, 0])
        raise ValueError(
            f"{name}[{token}] = {value[token].tolist()} selects one expert twice; experts must be distinct"
        )
