"""Comparators: bit-for-bit equality with the first mismatch spelled out (index, expected, actual)."""

from __future__ import annotations

import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor as uint8 (NaN == NaN, -0.0 != +0.0: what "bit for bit" means)."""
    t = t.detach().cpu().clone(memory_format=torch.contiguous_format)  # dense: a byte view needs stride(-1) == 1
    return t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


def first_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when equal bit for bit; else a sentence naming the first differing element."""
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} != expected {expected.dtype}"
    if actual.shape != expected.shape:
        return f"shape {list(actual.shape)} != expected {list(expected.shape)}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.numel() == 0 or torch.equal(bits(a), bits(e)):
        return None
    size = a.element_size()
    differ = (bits(a).view(-1, size) != bits(e).view(-1, size)).any(1)
    flat = int(differ.nonzero()[0])
    index = list(torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else []
    index = [int(i) for i in index]
    count = int(differ.sum())
    return (
        f"{count} of {a.numel()} elements differ; first at {index}: "
        f"actual {a.reshape(-1)[flat].item()!r}, expected {e.reshape(-1)[flat].item()!r}"
    )


def assert_bit_equal(name: str, actual: object, expected: object) -> None:
    """Assert equal bit for bit (tensors), or equal (lists, ints, None); message names `name`."""
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
            raise AssertionError(f"{name}: {type(actual).__name__} vs expected {type(expected).__name__}")
        problem = first_mismatch(actual, expected)
        if problem:
            raise AssertionError(f"{name}: {problem}")
    elif isinstance(expected, tuple) and isinstance(actual, tuple) and len(actual) == len(expected):
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_bit_equal(f"{name}[{i}]", a, e)
    elif actual != expected:
        raise AssertionError(f"{name}: {actual!r} != expected {expected!r}")
