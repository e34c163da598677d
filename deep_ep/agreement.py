"""Collective agreement: ranks check, with one tiny all-gather, that they call the same operation with
arguments that must match (SPEC section 8). A mismatch raises `CollectiveMismatchError` on every rank,
naming what each rank passed, instead of hanging in a collective whose sizes differ. A rank that rejected
its own arguments still sends a (rejected) row, so its peers fail the same call instead of pairing it with
that rank's next one.
"""

from __future__ import annotations

import zlib

import torch

from .comm import Comm
from .errors import CollectiveMismatchError

# The fields each operation agrees on, in wire order. Adding a field appends to its op's tuple.
OPERATIONS: dict[str, tuple[str, ...]] = {
    "create": (
        "backend",
        "low_latency_mode",
        "explicitly_destroy",
        "low_latency_quant",
        "num_nvl_bytes",
        "num_rdma_bytes",
    ),
    "dispatch": (
        "hidden",
        "x_dtype",
        "x_row_bytes",
        "scales_row_bytes",
        "num_topk",
        "topk_dtype",
        "num_experts",
        "num_channels",
        "num_worst_tokens",
        "scales_dtype",
        "on_buffer_device",
    ),
    "cached_dispatch": (
        "hidden",
        "x_dtype",
        "x_row_bytes",
        "scales_dtype",
        "scales_row_bytes",
        "num_worst_tokens",
        "handle_serial",
        "on_buffer_device",
    ),
    "combine": ("hidden", "x_dtype", "num_topk", "num_worst_tokens", "handle_serial", "on_buffer_device"),
    "low_latency_dispatch": (
        "num_max_dispatch_tokens_per_rank",
        "hidden",
        "num_experts",
        "num_topk",
        "use_fp8",
        "quant",
        "round_scale",
        "use_ue8m0",
        "on_buffer_device",
    ),
    "low_latency_combine": (
        "num_max_dispatch_tokens_per_rank",
        "hidden",
        "num_experts",
        "num_topk",
        "handle_serial",
        "on_buffer_device",
    ),
    "moe_layer": ("hidden", "ffn_hidden", "num_experts", "top_k", "expert_alignment", "seed"),
    # deep_ep.autograd's combine of non-float32 weights: announces its second combine (the weights' own)
    "combine_weights_apart": ("weights_dtype",),
    "destroy": (),
}
_OP_NAMES = list(OPERATIONS)
_WIDTH = 1 + max(len(fields) for fields in OPERATIONS.values())
_DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]


def dtype_code(dtype: torch.dtype | None) -> int:
    """A small integer for a dtype (-1 for None) that means the same on every rank."""
    if dtype is None:
        return -1
    return _DTYPES.index(dtype) if dtype in _DTYPES else 1000 + name_code(str(dtype))


def name_code(name: str) -> int:
    """A small integer for a name (a backend's, say) that means the same on every rank."""
    return zlib.crc32(name.encode())


def check_agreement(comm: Comm, op: str, labels: dict[str, list[str]] | None = None, **fields: int) -> None:
    """All-gather (op, fields) and raise CollectiveMismatchError on every rank if any rank differs. `labels`:
    for a field sent as `name_code(name)`, the names it may stand for, so that errors show names."""
    names = OPERATIONS[op]
    assert set(fields) == set(names), f"agreement fields of {op}: {sorted(fields)} != {sorted(names)}"
    row = [_OP_NAMES.index(op)] + [int(fields[name]) for name in names]
    row += [0] * (_WIDTH - len(row))
    rows = comm.all_gather_ints(row, op)
    if all(other == rows[0] for other in rows):
        return
    rejected = [rank for rank, r in enumerate(rows) if r[0] < 0]
    if rejected:
        raise CollectiveMismatchError(
            f"{op}: rank(s) {rejected} rejected their arguments (the reason is raised there), so the call ran on "
            "no rank"
        )
    ops = {r[0] for r in rows}
    if len(ops) > 1:
        detail = "; ".join(
            f"rank {rank}: {_OP_NAMES[r[0]] if r[0] < len(_OP_NAMES) else r[0]}" for rank, r in enumerate(rows)
        )
        raise CollectiveMismatchError(f"{op}: ranks called different operations ({detail})")
    disagreeing = [i for i, name in enumerate(names, start=1) if len({r[i] for r in rows}) > 1]
    shown = {field: {name_code(name): repr(name) for name in known} for field, known in (labels or {}).items()}
    detail = "; ".join(
        f"{names[i - 1]}: "
        + ", ".join(f"rank {rank}={shown.get(names[i - 1], {}).get(r[i], r[i])}" for rank, r in enumerate(rows))
        for i in disagreeing
    )
    raise CollectiveMismatchError(f"{op}: ranks disagree on arguments that must match across ranks ({detail})")


def reject_agreement(comm: Comm, op: str) -> None:
    """This rank's part in `check_agreement` when it rejected its own arguments to `op`: a row that makes every
    peer raise CollectiveMismatchError, so no peer pairs its call with this rank's next one."""
    comm.all_gather_ints([-1 - _OP_NAMES.index(op)] + [0] * (_WIDTH - 1), op)
