"""EMULATION of torch_npu's fused MoE dispatch/combine ops, on CPU tensors over a gloo group.

This stands in for the vendor ops in tests only; nothing here runs on an NPU or claims to match the
hardware beyond what the documentation states. Each emulated op is a collective like the real one: every
rank's call takes part in the exchange. What it implements, from the torch_npu / aclnn docs (see
docs/ASCEND.md for the sources):

- argument binding against the torch-npu 2.14.0 schema (`schemas.py`) and the documented argument checks
  and limits of each chip (A2 / A3) and op generation (v1 / v2), written here independently of the
  backend's own support matrix so that a wrong table in the backend shows up as an op error;
- output shapes and dtypes as torch-npu 2.14.0's meta functions give them (no TP, no shared experts);
- quant_mode=2, the documented per-token int8 rule: s = 127 / max|x| (float32), q = int8(x * s),
  dynamic scale = 1 / s; rounding half to even; all-zero rows (0 * inf) give q = 0 and scale 0;
- the received rows of `expand_x` grouped by local expert, then source rank, then token index; rows past
  the received count hold a marker (77 / NaN), as the op leaves them unwritten;
  `ep_recv_counts` = running totals in that (expert, source) order; `expert_token_nums` per expert;
- combine: each row back to its token, summed in float32 over k ascending as
  sum(expert_scales[t, k] * row), each product rounded, then one cast to the output dtype; under A2's
  'hierarchy' algorithm (picked by HCCL_INTRA_PCIE_ENABLE=1, HCCL_INTRA_ROCE_ENABLE=0 where no comm_alg is
  given) the weight is the row's dispatch-time scale (expand_scales), as the op's A2 kernels take it;
  rows of tokens the x_active_mask leaves inactive are not written (NaN here; uninitialised on the NPU);
- HCCL_BUFFSIZE too small for the documented formula fails the call, as the real op would fail.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ...packing import RowFormat

_MB = 1 << 20
_MAGIC = 0x4D43_3245  # marks assist_info rows written by this emulation


class EmulatedOpError(RuntimeError):
    """What the emulated op raises where the real op's argument check would fail (an aclnn error)."""


@dataclass
class EmulationState:
    """One process's emulated NPU: the chip, the HCCL-named groups, and a record of the op calls."""

    chip: str  # "A2" or "A3"
    device_name: str
    relax_world_size: bool = False
    comms: dict[str, dist.ProcessGroup] = field(default_factory=dict)
    fixed: dict[str, tuple[int, int]] = field(default_factory=dict)  # comm name -> (global_bs, moe_expert_num)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


# ---- documented limits, per (chip, generation) ------------------------------------------------------
def _check(condition: bool, message: str) -> None:
    if not condition:
        raise EmulatedOpError(f"[EMULATION of torch_npu] {message}")


def _world_sizes(state: EmulationState, generation: str, comm_alg: str) -> tuple[str, Any]:
    if state.chip == "A3":
        if generation == "v2":
            return "[2, 768]", lambda n: 2 <= n <= 768
        allowed = {8, 16, 32, 64, 128, 144, 256, 288}
    elif generation == "v2" and comm_alg != "hierarchy":
        allowed = {16, 32, 64, 128, 256}
    else:
        allowed = {16, 32, 64}
    if state.relax_world_size and state.chip == "A2":  # EMULATION-only: run the A2 path at 2..8 ranks
        return f"{sorted(allowed)} (relaxed to any size >= 2 by the emulation)", lambda n: n >= 2
    return str(sorted(allowed)), lambda n: n in allowed


def _resolve_alg(state: EmulationState, comm_alg: str) -> str:
    if state.chip == "A2" and comm_alg == "":  # documented: the HCCL variables pick the algorithm
        pcie = os.environ.get("HCCL_INTRA_PCIE_ENABLE") == "1" and os.environ.get("HCCL_INTRA_ROCE_ENABLE") == "0"
        return "hierarchy" if pcie else "fullmesh"
    return comm_alg


def _check_common(
    state: EmulationState, generation: str, group: dist.ProcessGroup, a: dict[str, Any], comm_alg: str
) -> tuple[int, int, int, int, int]:
    """Checks shared by dispatch and combine; returns (R, L, BS, K, max_bs)."""
    num_ranks = dist.get_world_size(group)
    _check(a["ep_world_size"] == num_ranks, f"ep_world_size={a['ep_world_size']} but the group has {num_ranks}")
    _check(a["ep_rank_id"] == dist.get_rank(group), f"ep_rank_id={a['ep_rank_id']} is not this rank")
    text, ok = _world_sizes(state, generation, comm_alg)
    _check(ok(num_ranks), f"{state.chip} {generation}: ep_world_size={num_ranks} not in {text}")
    _check(a["shared_expert_rank_num"] == 0, "shared expert ranks are not emulated")
    if generation == "v1":  # the v1 docs: A3 supports only 1 (the default), A2 takes the default
        _check(a["shared_expert_num"] == 1, f"{state.chip} v1: shared_expert_num={a['shared_expert_num']}, only 1")
    _check(a.get("tp_world_size", 0) in (0, 1), "TP communication is not emulated")
    num_experts = a["moe_expert_num"]
    max_experts = 1024 if (state.chip == "A3" and generation == "v2") else 512
    _check(1 <= num_experts <= max_experts, f"moe_expert_num={num_experts} not in [1, {max_experts}]")
    _check(num_experts % num_ranks == 0, f"moe_expert_num={num_experts} % ep_world_size={num_ranks} != 0")
    local = num_experts // num_ranks
    if state.chip == "A2" and comm_alg != "hierarchy":
        _check(local <= 24, f"A2: moe_expert_num / ep_world_size = {local} > 24")
    ids = a["expert_ids"]
    _check(ids.dim() == 2 and ids.dtype == torch.int32, f"expert_ids must be int32 2-D, got {ids.dtype} {ids.dim()}-D")
    bs, num_topk = ids.shape
    max_bs_chip = 512 if state.chip == "A3" else 256
    _check(0 < bs <= max_bs_chip, f"{state.chip}: BS={bs} not in (0, {max_bs_chip}]")
    max_k = 8 if (state.chip == "A3" and generation == "v1") else 16
    _check(0 < num_topk <= min(max_k, num_experts), f"K={num_topk} not in (0, min({max_k}, moe_expert_num)]")
    _check(bool(((ids >= 0) & (ids < num_experts)).all()), "expert_ids values must lie in [0, moe_expert_num)")
    ordered = ids.sort(1).values
    _check(not bool((ordered[:, 1:] == ordered[:, :-1]).any()), "the K expert_ids of a token must be distinct")
    global_bs = a["global_bs"]
    # Documented: global_bs and moe_expert_num must be the same in every layer (call) on one EP communicator.
    first = state.fixed.setdefault(a["group_ep"], (global_bs, num_experts))
    _check(
        first == (global_bs, num_experts),
        f"global_bs, moe_expert_num = {global_bs, num_experts}, but {first} "
        f"in an earlier call on group_ep={a['group_ep']!r}: they must stay the same in every call",
    )
    _check(global_bs == 0 or (global_bs % num_ranks == 0 and global_bs >= bs * num_ranks), f"global_bs={global_bs}")
    max_bs = global_bs // num_ranks if global_bs else bs
    return num_ranks, local, bs, num_topk, max_bs


def _check_hidden(state: EmulationState, generation: str, hidden: int, comm_alg: str) -> None:
    if state.chip == "A3":
        low, high = (7168, 7168) if generation == "v1" else (1024, 8192)
        _check(low <= hidden <= high, f"A3 {generation}: H={hidden} not in [{low}, {high}]")
    else:
        high = 10 * 1024 if comm_alg == "hierarchy" else 7168
        _check(0 < hidden <= high and hidden % 32 == 0, f"A2: H={hidden} must be in (0, {high}] and a multiple of 32")


def _check_mask(state: EmulationState, generation: str, mask: torch.Tensor | None, bs: int, k: int, alg: str) -> None:
    if mask is None:
        return
    _check(generation == "v2", "x_active_mask is a reserved parameter of the v1 ops; pass None")
    _check(mask.dtype == torch.bool, f"x_active_mask must be bool, got {mask.dtype}")
    if state.chip == "A2":
        _check(alg == "fullmesh", "A2: x_active_mask is only supported with comm_alg='fullmesh'")
        _check(mask.shape == (bs,), f"A2: x_active_mask must be 1-D [BS={bs}], got {list(mask.shape)}")
    else:
        _check(mask.shape in ((bs,), (bs, k)), f"A3: x_active_mask must be [BS] or [BS, K], got {list(mask.shape)}")
    if mask.dim() == 1:
        trues = int(mask.sum())
        _check(bool(mask[:trues].all()), "x_active_mask: every true must come before every false")


def _check_buffsize(state: EmulationState, generation: str, shape: tuple[int, ...], shared: int) -> None:
    r, local, bs, h, k = shape
    size = int(os.environ.get("HCCL_BUFFSIZE", "200"))
    if state.chip == "A2":  # fullmesh
        need_mb = math.ceil(2 * (bs * r * min(local, k) * h * 2 + 2 * _MB) / _MB)
    elif generation == "v1":  # MB * (size - 2) / 2 >= BS * 2 * (H + 128) * (R * L + K + 1)
        need_mb = 2 + math.ceil(2 * bs * 2 * (h + 128) * (r * local + k + 1) / _MB)
    else:
        a512 = lambda v: (v + 511) // 512 * 512  # noqa: E731
        a32 = lambda v: (v + 31) // 32 * 32  # noqa: E731
        need = 2 * (local * bs * r * a512(a32(2 * h) + 64) + (k + shared) * bs * a512(2 * h))
        need_mb = max(2, math.ceil(need / _MB))
    _check(size >= need_mb, f"HCCL_BUFFSIZE={size} MB is below the documented requirement of {need_mb} MB")


def _group(state: EmulationState, name: str) -> dist.ProcessGroup:
    _check(isinstance(name, str) and 1 <= len(name) < 128, f"group_ep must be a name of length [1, 128), got {name!r}")
    _check(name in state.comms, f"group_ep={name!r} is not an HCCL communicator name of this process")
    return state.comms[name]


# ---- the exchange ------------------------------------------------------------------------------------
def _exchange(group: dist.ProcessGroup, rows: torch.Tensor, dest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Send byte rows [M, W] to ranks `dest` [M]; returns (received rows, source rank of each), by source."""
    num_ranks = dist.get_world_size(group)
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=num_ranks)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    received = rows.new_empty(int(recv_counts.sum()), rows.shape[1])
    dist.all_to_all_single(received, rows[order].contiguous(), recv_counts.tolist(), send_counts.tolist(), group=group)
    source = torch.repeat_interleave(torch.arange(num_ranks), recv_counts)
    return received, source


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented quant_mode=2 rule, without SPEC 6.2's floor on max|x| (see module docstring)."""
    xf = x.float()
    amax = xf.abs().amax(1, keepdim=True)
    dyn = torch.full_like(amax, 127.0) / amax  # one float32 division; inf for an all-zero row
    q = torch.nan_to_num(torch.round(xf * dyn), nan=0.0).clamp(-128, 127).to(torch.int8)
    return q, (torch.ones_like(dyn) / dyn).squeeze(1)


def dispatch(state: EmulationState, generation: str, a: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """npu_moe_distribute_dispatch(_v2), EMULATED. `a` holds every schema argument (defaults filled)."""
    comm_alg = _resolve_alg(state, a.get("comm_alg", ""))
    group = _group(state, a["group_ep"])
    x, ids = a["x"], a["expert_ids"]
    _check(x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16), f"x must be bf16/fp16 2-D, got {x.dtype}")
    _check(x.shape[0] == ids.shape[0], f"x has {x.shape[0]} rows, expert_ids {ids.shape[0]}")
    num_ranks, local, bs, num_topk, max_bs = _check_common(state, generation, group, a, comm_alg)
    hidden = x.shape[1]
    _check_hidden(state, generation, hidden, comm_alg)
    if state.chip == "A2" and generation == "v2":
        _check(comm_alg in ("fullmesh", "hierarchy"), f"A2: comm_alg={comm_alg!r}")
    if state.chip == "A3" and generation == "v2":
        _check(comm_alg in ("", "fullmesh_v1", "fullmesh_v2"), f"A3: comm_alg={comm_alg!r}")
    mask = a["x_active_mask"]
    _check_mask(state, generation, mask, bs, num_topk, comm_alg)
    _check(a["quant_mode"] in (0, 2), f"quant_mode={a['quant_mode']} is not emulated (0 or 2)")
    _check(a["scales"] is None, "smooth scales are not emulated")
    _check(a["expert_token_nums_type"] in (0, 1), "expert_token_nums_type must be 0 or 1")
    for name in ("elastic_info", "performance_info", "y_dtype", "x_dtype", "scales_dtype"):
        _check(a.get(name) is None, f"{name} is not emulated")
    for name in ("zero_expert_num", "copy_expert_num", "const_expert_num"):
        _check(a.get(name, 0) == 0, f"{name} is not emulated")
    expert_scales = a["expert_scales"]
    if expert_scales is not None:
        _check(state.chip == "A2", "A3: expert_scales is not supported; pass None")
        _check(expert_scales.shape == ids.shape and expert_scales.dtype == torch.float32, "expert_scales: f32 [BS, K]")
    _check_buffsize(state, generation, (num_ranks, local, max_bs, hidden, num_topk), a["shared_expert_num"])

    capacity = max_bs * num_ranks * min(local, num_topk)  # A
    if mask is None:
        active = torch.ones(bs, num_topk, dtype=torch.bool)
    elif mask.dim() == 1:
        active = mask.unsqueeze(1).expand(bs, num_topk)
    else:
        active = mask
    quantized = a["quant_mode"] == 2
    payload, scale = _quantize(x) if quantized else (x, torch.zeros(bs))
    t_idx, k_idx = active.nonzero(as_tuple=True)
    expert = ids[t_idx, k_idx].long()
    weight = expert_scales[t_idx, k_idx] if expert_scales is not None else torch.zeros(t_idx.numel())
    fields = dict(
        row=payload[t_idx],
        scale=scale[t_idx].float(),
        meta=torch.stack([t_idx, k_idx, expert % local], 1).int(),
        weight=weight.float(),
    )
    fmt = RowFormat.of(**fields)
    received, source = _exchange(group, fmt.pack(**fields), expert // local)
    got = fmt.unpack(received)
    t_recv, k_recv, e_recv = got["meta"].long().unbind(1)
    order = torch.argsort((e_recv * num_ranks + source) * max_bs + t_recv)  # expert, then source, then token
    count = order.numel()
    _check(count <= capacity, f"received {count} rows, more than A={capacity}")

    # The op's outputs are allocated uninitialised and only the first `count` rows are written: the rest hold
    # a marker here (77, NaN), so that a caller reading them shows up instead of seeing convenient zeros.
    expand_x = payload.new_full((capacity, hidden), 77)
    expand_x[:count] = got["row"][order]
    dynamic_scales = torch.full((capacity,), float("nan"))
    if quantized:
        dynamic_scales[:count] = got["scale"][order]
    blocks = torch.zeros(local * num_ranks, dtype=torch.long)
    blocks.index_add_(0, e_recv * num_ranks + source, torch.ones_like(e_recv))
    ep_recv_counts = blocks.cumsum(0).int()
    per_expert = blocks.view(local, num_ranks).sum(1)
    expert_token_nums = per_expert if a["expert_token_nums_type"] == 1 else per_expert.cumsum(0)
    tail = 0
    expand_scales = torch.zeros(0)
    if expert_scales is not None:  # the meta function's size for chips before Ascend 950
        tail = max_bs * num_ranks * 2 * num_topk * (num_ranks // 8)
        expand_scales = torch.full((capacity,), float("nan"))
        expand_scales[:count] = got["weight"][order]
    ep_recv_counts = torch.cat([ep_recv_counts, torch.zeros(tail, dtype=torch.int32)])
    if generation == "v2":
        assist = torch.zeros(max(bs * num_topk, capacity * 128), dtype=torch.int32)
        rows = assist[: capacity * 128].view(capacity, 128)
        rows[:count, 0] = source[order].int()
        rows[:count, 1] = t_recv[order].int()
        rows[:count, 2] = k_recv[order].int()
        rows[:count, 3] = _MAGIC
    else:  # expand_idx: the position of each (t, k) within its destination (expert, source) block
        assist = torch.full((bs * num_topk,), -1, dtype=torch.int32)
        key = ids.long() * bs + torch.arange(bs).unsqueeze(1)
        key = torch.where(active, key, num_ranks * local * bs)
        sorted_key, perm = key.reshape(-1).sort(stable=True)
        expert_sorted = sorted_key // bs
        first = torch.searchsorted(sorted_key, expert_sorted * bs)
        position = torch.arange(perm.numel()) - first
        assist[perm] = torch.where(expert_sorted < num_ranks * local, position, -1).int()
    outputs = (
        expand_x,
        dynamic_scales,
        assist,
        expert_token_nums.long(),
        ep_recv_counts,
        torch.zeros(a.get("tp_world_size", 0), dtype=torch.int32),
        expand_scales,
    )
    return outputs


def combine(state: EmulationState, generation: str, a: dict[str, Any]) -> torch.Tensor:
    """npu_moe_distribute_combine(_v2), EMULATED."""
    comm_alg = _resolve_alg(state, a.get("comm_alg", ""))
    group = _group(state, a["group_ep"])
    expand_x, ids, weights = a["expand_x"], a["expert_ids"], a["expert_scales"]
    num_ranks, local, bs, num_topk, max_bs = _check_common(state, generation, group, a, comm_alg)
    hidden = expand_x.shape[1]
    _check_hidden(state, generation, hidden, comm_alg)
    capacity = max_bs * num_ranks * min(local, num_topk)
    _check(
        expand_x.dtype in (torch.bfloat16, torch.float16) and tuple(expand_x.shape) == (capacity, hidden),
        f"expand_x must be bf16/fp16 [A={capacity}, H], got {expand_x.dtype} {list(expand_x.shape)}",
    )
    _check(weights.dtype == torch.float32 and weights.shape == ids.shape, "expert_scales must be float32 [BS, K]")
    mask = a["x_active_mask"]
    _check_mask(state, generation, mask, bs, num_topk, comm_alg)
    expand_scales = a["expand_scales"]
    if state.chip == "A2":
        _check(expand_scales is not None, "A2: expand_scales (the dispatch's output) is required")
        _check(expand_scales.shape == (capacity,), f"A2: expand_scales must be [A={capacity}]")
    else:
        _check(expand_scales is None, "A3: expand_scales is not supported; pass None")
    counts = a["ep_send_counts"]
    base = local * num_ranks
    tail = max_bs * num_ranks * 2 * num_topk * (num_ranks // 8) if expand_scales is not None else 0
    _check(counts.dtype == torch.int32 and counts.shape == (base + tail,), f"ep_send_counts: int32 [{base + tail}]")
    for name in ("shared_expert_x", "elastic_info", "ori_x", "tp_send_counts", "performance_info"):
        _check(a.get(name) is None, f"{name} is not emulated")
    _check(a.get("comm_quant_mode", 0) == 0, "comm_quant_mode != 0 is not emulated")

    blocks = counts[:base].long().diff(prepend=torch.zeros(1, dtype=torch.long))  # rows per (expert, source)
    count = int(counts[base - 1])
    if generation == "v2":
        assist = a["assist_info_for_combine"]
        _check(assist.dtype == torch.int32 and assist.shape == (max(bs * num_topk, capacity * 128),), "assist_info")
        rows = assist[: capacity * 128].view(capacity, 128)[:count]
        _check(bool((rows[:, 3] == _MAGIC).all()), "assist_info_for_combine is not the dispatch's output")
        dest, t_back, k_back = rows[:, 0].long(), rows[:, 1], rows[:, 2]
    else:
        _check(a["expand_idx"].shape == (bs * num_topk,), "expand_idx must be [BS * K]")
        dest = torch.repeat_interleave(torch.arange(num_ranks).repeat(local), blocks)
        t_back = k_back = torch.zeros(count, dtype=torch.int32)  # v1: the source finds its rows by position
    fields = dict(row=expand_x[:count], meta=torch.stack([t_back, k_back], 1).int())
    hierarchy = comm_alg == "hierarchy"
    if hierarchy:  # the A2 hierarchy kernels weight each row by the scale it was dispatched with, not expert_scales
        fields["scale"] = expand_scales[:count].float().unsqueeze(1)
    fmt = RowFormat.of(**fields)
    received, source = _exchange(group, fmt.pack(**fields), dest)
    got = fmt.unpack(received)

    if mask is None:
        active = torch.ones(bs, num_topk, dtype=torch.bool)
    elif mask.dim() == 1:
        active = mask.unsqueeze(1).expand(bs, num_topk)
    else:
        active = mask
    slots = torch.zeros(bs, num_topk, hidden)
    present = torch.zeros(bs, num_topk, dtype=torch.bool)
    if generation == "v2":
        t_recv, k_recv = got["meta"].long().unbind(1)
    else:  # rows from rank d arrive block by block (its experts ascending), tokens ascending in a block
        t_idx, k_idx = active.nonzero(as_tuple=True)
        key = ids[t_idx, k_idx].long() * bs + t_idx
        order = torch.argsort(key)
        t_recv, k_recv = t_idx[order], k_idx[order]
        _check(t_recv.numel() == source.numel(), "combine received a different number of rows than dispatched")
    slots[t_recv, k_recv] = got["row"].float()
    present[t_recv, k_recv] = True
    if hierarchy:
        weights = torch.zeros(bs, num_topk)
        weights[t_recv, k_recv] = got["scale"].squeeze(1)
    acc = torch.zeros(bs, hidden)
    for k in range(num_topk):
        product = weights[:, k : k + 1] * slots[:, k]  # rounded product, then a separate add
        acc = acc + torch.where(present[:, k : k + 1], product, torch.zeros_like(product))
    # The op allocates x uninitialised and writes only the tokens x_active_mask activates (A3 kernel
    # LocalWindowCopy loops over the active tokens only): NaN stands for the rows it never writes.
    written = active.any(1, keepdim=True)
    return torch.where(written, acc, torch.full_like(acc, float("nan"))).to(expand_x.dtype)
