"""Rank functions and SPEC 9 comparisons of tests/test_ascend.py, in a module without pytest so that the
rank processes (forkserver children) import little. Everything here runs on the torch_npu EMULATION.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from deep_ep import BackendUnavailableError, Buffer, UnsupportedFeatureError
from deep_ep.backends import ascend
from deep_ep.testing.npu_emulation import EmulatedOpError, install, uninstall
from deep_ep.testing.workloads import make_workload


class _Caught:
    value: BaseException


@contextmanager
def raises(kind: type[BaseException], match: str | None = None) -> Iterator[_Caught]:
    """raises without importing pytest in the rank processes."""
    caught = _Caught()
    try:
        yield caught
    except kind as error:
        if match is not None and not re.search(match, str(error)):
            raise AssertionError(f"{kind.__name__} raised, but {match!r} is not in: {error}") from error
        caught.value = error
        return
    raise AssertionError(f"{kind.__name__} was not raised")


def ulp32(t: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(t, torch.full_like(t, float("inf"))) - t).abs()


def compare_dispatch(name: str, got: tuple, want: tuple, use_fp8: bool) -> None:
    """SPEC 9: counts and handle items equal; bf16 rows bit-equal; int8 values within 1, scales within 1 ulp."""
    recv, count, handle = got[0], got[1], got[2]
    ref_recv, ref_count, ref_handle = want[0], want[1], want[2]
    assert torch.equal(count, ref_count), f"{name}: recv_count {count.tolist()} != {ref_count.tolist()}"
    assert torch.equal(handle[1], ref_handle[1]), f"{name}: layout_range differs"
    assert tuple(handle[2:]) == tuple(ref_handle[2:]), f"{name}: handle scalars differ"
    for e, n in enumerate(ref_count.tolist()):
        assert torch.equal(handle[0][e, :n], ref_handle[0][e, :n]), f"{name}: src_info of expert {e} differs"
        if not use_fp8:
            assert torch.equal(recv[e, :n].view(torch.int16), ref_recv[e, :n].view(torch.int16)), f"{name}: rows"
            continue
        q, s = recv[0][e, :n], recv[1][e, :n]
        ref_q, ref_s = ref_recv[0][e, :n], ref_recv[1][e, :n]
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert bool(((q.int() - ref_q.int()).abs() <= 1).all()), f"{name}: int8 values differ by more than 1"
        assert bool(((s - ref_s).abs() <= ulp32(ref_s)).all()), f"{name}: scales differ by more than 1 ulp"
    if use_fp8:
        assert recv[0].shape == ref_recv[0].shape and recv[1].shape == ref_recv[1].shape
    else:
        assert recv.shape == ref_recv.shape and recv.dtype == ref_recv.dtype


def expert_output(recv: object, use_fp8: bool) -> torch.Tensor:
    """A deterministic stand-in for the experts: dequantise, scale, back to bf16 [L, R*T, H]."""
    x = recv[0].float() * recv[1].unsqueeze(-1) if use_fp8 else recv.float()
    return (x * 0.75 + 0.125).to(torch.bfloat16)


def compare_combine(
    name: str, out: torch.Tensor, ref: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor | None
) -> None:
    """bf16 path: bit-equal. int8 path: |out - ref| <= sum_k |w_k| * scale_t / 2 + 1 bf16 ulp of |ref|."""
    if scale is None:
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), f"{name}: combined_x differs"
        return
    ref32 = ref.float()
    ulp = (torch.nextafter(ref.abs(), torch.full_like(ref, float("inf"))).float() - ref32.abs()).abs()
    # The expert stand-in scales values by 0.75, so the quantisation error bound scales with it.
    bound = weights.abs().sum(1, keepdim=True) * 0.75 * scale.unsqueeze(1) / 2 + ulp
    assert bool(((out.float() - ref32).abs() <= bound).all()), f"{name}: combined_x outside the SPEC 9 bound"


def ll_round(rank: int, world: int, fused: Buffer, ref: Buffer, case: dict, use_fp8: bool) -> None:
    w = make_workload(
        world, case["tokens"], case["hidden"], case["topk"], case["experts"], seed=case["seed"], routing=case["routing"]
    )
    tokens_cap, name = case["cap"], f"{case['routing']} use_fp8={use_fp8}"
    got = fused.low_latency_dispatch(w.x[rank], w.topk_idx[rank], tokens_cap, w.num_experts, use_fp8=use_fp8)
    want = ref.low_latency_dispatch(w.x[rank], w.topk_idx[rank], tokens_cap, w.num_experts, use_fp8=use_fp8)
    compare_dispatch(name, got, want, use_fp8)
    idx, weights = w.topk_idx[rank], w.topk_weights[rank]
    out, _, _ = fused.low_latency_combine(expert_output(got[0], use_fp8), idx, weights, got[2])
    ref_out, _, _ = ref.low_latency_combine(expert_output(want[0], use_fp8), idx, weights, want[2])
    scale = None
    if use_fp8:
        from deep_ep.quant import per_token_cast_to_int8

        scale = per_token_cast_to_int8(w.x[rank])[1]
    compare_combine(name, out, ref_out, w.topk_weights[rank], scale)


def normal_round(rank: int, world: int, fused: Buffer, ref: Buffer) -> None:
    w = make_workload(world, 6, 32, 2, 2 * world, seed=7, routing="sparse")
    outs = []
    for buffer in (fused, ref):
        layout = buffer.get_dispatch_layout(w.topk_idx[rank], w.num_experts)
        recv_x, idx, weights, counts, handle, _ = buffer.dispatch(
            w.x[rank],
            num_tokens_per_rank=layout[0],
            num_tokens_per_rdma_rank=layout[1],
            is_token_in_rank=layout[3],
            num_tokens_per_expert=layout[2],
            topk_idx=w.topk_idx[rank],
            topk_weights=w.topk_weights[rank],
        )
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=weights)
        outs.append((recv_x, idx, weights, counts, handle[0], handle[3], combined, combined_w))
    for i, (a, b) in enumerate(zip(*outs)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"normal mode output {i} differs"
        else:
            assert a == b, f"normal mode output {i} differs"


CASES = [
    dict(routing="sparse", tokens=3, topk=2, seed=1),
    dict(routing="uniform", tokens=[4, 2, 4, 1, 3, 4, 0, 2], topk=3, seed=2),
    dict(routing="idle_rank", tokens=4, topk=2, seed=3),
]


def fused_and_reference() -> tuple[Buffer, Buffer]:
    """A low-latency Buffer on the ascend backend and one on the reference backend in its int8 format."""
    fused = Buffer(dist.group.WORLD, low_latency_mode=True, backend="ascend")
    return fused, Buffer(dist.group.WORLD, low_latency_mode=True, backend="reference", low_latency_quant="int8")


@contextmanager
def logged() -> Iterator[list[str]]:
    """The messages the ascend backend logs inside the block."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    ascend.log.addHandler(handler)
    try:
        yield records
    finally:
        ascend.log.removeHandler(handler)


def differential(rank: int, world: int, chip: str, hidden: int, generations: tuple[str, ...] = ("v2", "v1")) -> dict:
    state = install(chip, generations=generations, relax_world_size=True)
    fused, ref = fused_and_reference()
    assert fused.backend == "ascend" and fused.low_latency_quant == "int8"
    for case in CASES:
        tokens = case["tokens"][:world] if isinstance(case["tokens"], list) else case["tokens"]
        full = dict(case, tokens=tokens, hidden=hidden, experts=2 * world, cap=4)
        for use_fp8 in (False, True):
            ll_round(rank, world, fused, ref, full, use_fp8)
    normal_round(rank, world, fused, ref)
    return {"ops": sorted({name for name, _ in state.calls}), "fallbacks": sorted(ascend._logged)}


def fallback(rank: int, world: int, chip: str, hidden: int) -> dict:
    state = install(chip)  # the real A2 limits: 16 or more ranks
    fused, ref = fused_and_reference()
    with logged() as records:
        case = dict(routing="sparse", tokens=3, topk=2, seed=4, hidden=hidden, experts=2 * world, cap=4)
        for use_fp8 in (True, False):
            w = make_workload(world, 3, hidden, 2, 2 * world, seed=4, routing="sparse")
            got = fused.low_latency_dispatch(w.x[rank], w.topk_idx[rank], 4, w.num_experts, use_fp8=use_fp8)
            want = ref.low_latency_dispatch(w.x[rank], w.topk_idx[rank], 4, w.num_experts, use_fp8=use_fp8)
            # The reference algorithm on the same group: identical, bit for bit, int8 included.
            # Rows at or past recv_count are unspecified (SPEC 6): only valid rows are compared.
            recv, ref_recv = (got[0], want[0]) if not use_fp8 else (got[0][0], want[0][0])
            assert torch.equal(got[1], want[1])
            for e, n in enumerate(want[1].tolist()):
                assert torch.equal(recv[e, :n].view(torch.uint8), ref_recv[e, :n].view(torch.uint8))
                if use_fp8:
                    assert torch.equal(got[0][1][e, :n], want[0][1][e, :n])
            ll_round(rank, world, fused, ref, case, use_fp8)
    return {"ops": len(state.calls), "logged": records}


def hierarchy(rank: int, world: int, generation: str) -> dict:
    """A2 with the HCCL variables that select the 'hierarchy' algorithm (set by the test): low-latency rounds
    against the reference backend, the ops called and what was logged."""
    state = install("A2", generations=(generation,), relax_world_size=True)
    fused, ref = fused_and_reference()
    with logged() as records:
        for use_fp8 in (False, True):
            ll_round(rank, world, fused, ref, dict(CASES[0], hidden=64, experts=2 * world, cap=4), use_fp8)
    return {"ops": sorted({name for name, _ in state.calls}), "logged": records}


def strict(rank: int, world: int) -> str:
    install("A2")
    fused = Buffer(dist.group.WORLD, low_latency_mode=True, backend="ascend")
    w = make_workload(world, 2, 64, 2, 4, seed=5)
    with raises(UnsupportedFeatureError, match="group size 2 is not accepted by the A2 v2 ops") as info:
        fused.low_latency_dispatch(w.x[rank], w.topk_idx[rank], 4, w.num_experts)
    return str(info.value)


def small_buffsize(rank: int, world: int) -> str:
    install("A3")
    fused = Buffer(dist.group.WORLD, low_latency_mode=True, backend="ascend")
    w = make_workload(world, 4, 1024, 2, 4, seed=6)
    with raises(ValueError, match="HCCL_BUFFSIZE=1 MB is too small") as info:
        fused.low_latency_dispatch(w.x[rank], w.topk_idx[rank], 4, w.num_experts)
    return str(info.value)


def record_calls(rank: int, world: int) -> list:
    calls = []
    for chip, generations, hidden in (("A3", ("v2",), 1024), ("A2", ("v2",), 64), ("A2", ("v1",), 64)):
        state = install(chip, generations=generations, relax_world_size=True)
        buffer = Buffer(dist.group.WORLD, low_latency_mode=True, backend="ascend")
        w = make_workload(world, 3, hidden, 2, 2 * world, seed=8, routing="sparse")
        for use_fp8 in (False, True):
            recv, _, handle, _, _ = buffer.low_latency_dispatch(
                w.x[rank], w.topk_idx[rank], 4, w.num_experts, use_fp8=use_fp8
            )
            y = expert_output(recv, use_fp8)
            buffer.low_latency_combine(y, w.topk_idx[rank], w.topk_weights[rank], handle)
        for name, call in state.calls:
            kinds = {
                k: type(v).__name__ if not isinstance(v, torch.Tensor) else "Tensor" for k, v in call["kwargs"].items()
            }
            calls.append((chip, name, call["args"], kinds))
    uninstall()
    return calls


def meta_shapes(rank: int, world: int) -> dict:
    out = {}
    for chip, generation, tokens, topk, experts, hidden, quant_mode, scales in (
        ("A3", "v2", 4, 2, 4, 1024, 2, False),
        ("A2", "v2", 3, 3, 8, 64, 0, True),
        ("A2", "v1", 3, 3, 8, 64, 0, True),
    ):
        state = install(chip, generations=(generation,), relax_world_size=True)
        npu = sys.modules["torch_npu"]
        name = ascend.vendor.hccl_comm_name(dist.group.WORLD)
        gen = torch.Generator().manual_seed(rank)
        ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)]).int()
        suffix = "_v2" if generation == "v2" else ""
        kwargs = dict(
            x=torch.randn(tokens, hidden, generator=gen).bfloat16(),
            expert_ids=ids,
            group_ep=name,
            ep_world_size=world,
            ep_rank_id=rank,
            moe_expert_num=experts,
            quant_mode=quant_mode,
            global_bs=tokens * world,
            **({"shared_expert_num": 0} if generation == "v2" else {}),  # v1: only the default (1)
        )
        if scales:
            kwargs["expert_scales"] = torch.ones(tokens, topk)
        result = getattr(npu, f"npu_moe_distribute_dispatch{suffix}")(**kwargs)
        out[(chip, generation)] = [(tuple(t.shape), str(t.dtype)) for t in result]
        assert len(state.calls) == 1
    return out


def op_errors(rank: int, world: int) -> list[str]:
    install("A3")
    npu = sys.modules["torch_npu"]
    name = ascend.vendor.hccl_comm_name(dist.group.WORLD)
    x = torch.zeros(2, 1024, dtype=torch.bfloat16)
    base = dict(x=x, group_ep=name, ep_world_size=world, ep_rank_id=rank, moe_expert_num=4)
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    errors = []
    for bad in (
        dict(expert_ids=torch.tensor([[0, 0], [2, 3]], dtype=torch.int32)),  # duplicate ids in a row
        dict(expert_ids=ids.long()),  # int64 ids
        dict(expert_ids=ids, expert_scales=torch.ones(2, 2)),  # A3 takes no expert_scales
        dict(expert_ids=ids, x_active_mask=torch.tensor([False, True])),  # false before true
        dict(expert_ids=ids, quant_mode=1),
    ):
        with raises(EmulatedOpError) as info:
            npu.npu_moe_distribute_dispatch_v2(**base, **bad)
        errors.append(str(info.value))
    with raises(TypeError, match="unexpected keyword"):
        npu.npu_moe_distribute_dispatch_v2(**base, expert_ids=ids, not_an_argument=1)
    with raises(TypeError, match="ep_world_size"):
        npu.npu_moe_distribute_dispatch_v2(**dict(base, ep_world_size=float(world)), expert_ids=ids)
    return errors


def availability(rank: int, world: int) -> dict:
    group = dist.group.WORLD
    out = {}
    with raises(BackendUnavailableError, match="backend 'ascend' is unavailable"):
        Buffer(group, backend="ascend")
    out["auto_without"] = Buffer(group).backend
    state = install("A3")
    out["auto_with"] = Buffer(group).backend
    with raises(UnsupportedFeatureError, match="does not implement low_latency_quant='fp8'"):
        Buffer(group, backend="ascend", low_latency_quant="fp8")
    real = ascend.Vendor()
    saved, ascend.vendor = ascend.vendor, real
    out["gloo"] = ascend.AscendBackend.unavailable_reason(group, torch.device("cpu"))
    ascend.vendor = saved
    state.device_name = "Ascend310P3"
    out["chip"] = ascend.AscendBackend.unavailable_reason(group, torch.device("cpu"))
    uninstall()
    return out


def no_emulation(rank: int, world: int) -> None:
    Buffer(dist.group.WORLD, backend="ascend")


def lazy_import(rank: int, world: int) -> str:
    import deep_ep.backends.ascend as module

    assert "torch_npu" not in sys.modules
    reason = module.AscendBackend.unavailable_reason(dist.group.WORLD, torch.device("cpu"))
    assert "torch_npu" not in sys.modules
    return reason


def empty_tokens(rank: int, world: int) -> list:
    """A3 (2-D x_active_mask): tokens whose K entries are all -1 combine to +0.0, not to what the op leaves in
    rows it does not write (the EMULATION leaves NaN there, as the op leaves them uninitialised)."""
    install("A3", generations=("v2",))
    fused = Buffer(dist.group.WORLD, low_latency_mode=True, backend="ascend")
    w = make_workload(world, 4, 1024, 2, 2 * world, seed=9)
    idx = w.topk_idx[rank].clone()
    idx[1] = -1  # token 1 selects nothing; the others keep their experts
    recv, _, handle, _, _ = fused.low_latency_dispatch(w.x[rank], idx, 4, w.num_experts, use_fp8=False)
    out, _, _ = fused.low_latency_combine(expert_output(recv, False), idx, w.topk_weights[rank], handle)
    return out.float().tolist()


def uneven_buffsize(rank: int, world: int) -> str:
    """HCCL_BUFFSIZE set differently on each rank: every rank must raise (none may wait for the others)."""
    import os

    install("A3")
    os.environ["HCCL_BUFFSIZE"] = str(300 + rank)
    fused = Buffer(dist.group.WORLD, low_latency_mode=True, backend="ascend")
    w = make_workload(world, 4, 1024, 2, 4, seed=6)
    with raises(ValueError, match="HCCL_BUFFSIZE differs across ranks") as info:
        fused.low_latency_dispatch(w.x[rank], w.topk_idx[rank], 4, w.num_experts)
    return str(info.value)


def changing_shape(rank: int, world: int) -> dict:
    """Low-latency rounds with T = 4, then T = 8, then E doubled, on one Buffer (A3): the ops require global_bs
    and moe_expert_num fixed per communicator, so only the first shape may take the fused path."""
    state = install("A3", generations=("v2",))
    fused, ref = fused_and_reference()
    with logged() as records:
        for cap, experts in ((4, 2 * world), (8, 2 * world), (4, 4 * world), (4, 2 * world)):
            case = dict(CASES[0], hidden=1024, experts=experts, cap=cap)
            ll_round(rank, world, fused, ref, case, use_fp8=False)
    return {"ops": len(state.calls), "logged": records}
