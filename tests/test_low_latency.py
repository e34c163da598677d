"""Low-latency mode (SPEC section 6): the reference backend on real gloo worlds == the executable spec, bit for bit.

Every rank builds every rank's inputs from one seed, runs the Buffer for itself, and computes the whole
world's expected result with `reference.low_latency_dispatch` / `reference.low_latency_combine`. Rows at
or past `recv_count` are unspecified (SPEC 6): only valid rows are compared, and the expert outputs fed to
combine carry NaN in those rows, so a combine that read one would show it.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist

import reference
from deep_ep import Buffer, CollectiveMismatchError
from deep_ep.backends import register_backend
from deep_ep.backends.reference import ReferenceBackend
from deep_ep.testing import run_ranks
from deep_ep.testing.compare import assert_bit_equal
from deep_ep.testing.workloads import Workload, make_workload

# Wire formats: the Buffer's low_latency_quant and the dispatch flags; hidden is the smallest size each allows.
FORMATS = {
    "bf16": dict(quant="fp8", use_fp8=False, round_scale=False, use_ue8m0=False, hidden=16),
    "fp8": dict(quant="fp8", use_fp8=True, round_scale=False, use_ue8m0=False, hidden=128),
    "fp8_round": dict(quant="fp8", use_fp8=True, round_scale=True, use_ue8m0=False, hidden=128),
    "fp8_ue8m0": dict(quant="fp8", use_fp8=True, round_scale=True, use_ue8m0=True, hidden=512),
    "int8": dict(quant="int8", use_fp8=True, round_scale=False, use_ue8m0=False, hidden=16),
}
_TOKENS = [7, 0, 5, 8, 3, 6, 1, 4]  # uneven, N < T, N = T and N = 0 (T = 8)


# ---------------------------------------------------------------------------------------------------------
# Helpers (module level: run_ranks pickles the function it runs on every rank).
# ---------------------------------------------------------------------------------------------------------
def _workload(world: int, case: dict, hidden: int) -> Workload:
    """make_workload plus the routing corners that random routing may miss, identical on every rank."""
    experts_per_rank = case["experts_per_rank"]
    num_experts = experts_per_rank * world
    tokens = case.get("tokens", _TOKENS[:world] if world > 1 else [7])
    w = make_workload(world, tokens, hidden, case["topk"], num_experts, seed=case["seed"], routing=case["routing"])
    gen = torch.Generator().manual_seed(case["seed"] + 1000)
    for s, idx in enumerate(w.topk_idx):
        num_tokens, num_topk = idx.shape
        if num_tokens >= 1 and num_topk >= 2 and experts_per_rank >= 2:
            # Token 0 picks two experts of one rank, the higher one first (k order != expert order).
            d = (s + 1) % world
            idx[0] = -1
            idx[0, 0], idx[0, 1] = d * experts_per_rank + 1, d * experts_per_rank
        if num_tokens >= 2 and num_topk >= 2:
            idx[1, -1] = -1
        if num_tokens >= 3:
            idx[2] = -1  # a token that selects nothing
        # Weights are nonzero where the index is -1 too: combine must skip those entries, not multiply by 0.
        w.topk_weights[s] = torch.rand(idx.shape, generator=gen) + 0.1
        if case.get("int32"):
            w.topk_idx[s] = idx.int()
    return w


def _dispatch(buffer: Buffer, mode: str, x, idx, tokens_cap: int, num_experts: int, fmt: dict, **stats):
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x,
        idx,
        tokens_cap,
        num_experts,
        use_fp8=fmt["use_fp8"],
        round_scale=fmt["round_scale"],
        use_ue8m0=fmt["use_ue8m0"],
        async_finish=mode == "async",
        return_recv_hook=mode == "hook",
        **stats,
    )
    _complete(mode, event, hook)
    return recv_x, recv_count, handle


def _combine(buffer: Buffer, mode: str, y, idx, weights, handle, **kwargs) -> torch.Tensor:
    combined, event, hook = buffer.low_latency_combine(
        y, idx, weights, handle, async_finish=mode == "async", return_recv_hook=mode == "hook", **kwargs
    )
    _complete(mode, event, hook)
    return combined


def _complete(mode: str, event, hook) -> None:
    if mode == "hook":
        assert callable(hook), "return_recv_hook=True must return a hook"
        hook()
    else:
        assert hook is None, "no hook without return_recv_hook"
        if mode == "async":
            event.current_stream_wait()


def _split(recv_x) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (recv_x[0], recv_x[1]) if isinstance(recv_x, tuple) else (recv_x, None)


def _unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64)
    exponent = (packed.long().unsqueeze(-1) >> shifts) & 0xFF
    return (exponent.flatten(-2) << 23).int().view(torch.float32)


def _dequantize(recv_x) -> torch.Tensor:
    """float32 [L, R*T, H] from any SPEC 6 receive format."""
    data, scales = _split(recv_x)
    if scales is None:
        return data.float()
    if data.dtype == torch.int8:
        return data.float() * scales.unsqueeze(-1)
    if scales.dtype == torch.int32:
        scales = _unpack_ue8m0(scales)
    return (data.float().unflatten(-1, (-1, 128)) * scales.unsqueeze(-1)).flatten(-2)


def _expert_output(recv_x, rank: int) -> torch.Tensor:
    """bf16 [L, R*T, H]: depends on the rank, the local expert and the row, so any mix-up in combine shows."""
    deq = _dequantize(recv_x)
    experts, rows, _ = deq.shape
    i = torch.arange(experts, dtype=torch.float32).view(experts, 1, 1)
    j = torch.arange(rows, dtype=torch.float32).view(1, rows, 1)
    return (deq * (1 + 0.25 * i + 0.5 * rank) + 0.0625 * j).to(torch.bfloat16)


def _spec_round(w: Workload, rank: int, tokens_cap: int, **dispatch_kwargs) -> tuple[list[dict], torch.Tensor]:
    """The executable spec's dispatch on every rank, and this rank's combine of `_expert_output` of what each
    rank received: the expectation of one low-latency round."""
    want_all = reference.low_latency_dispatch(w.x, w.topk_idx, tokens_cap, w.num_experts, **dispatch_kwargs)
    ys = [_expert_output(o["recv_x"], d) for d, o in enumerate(want_all)]
    return want_all, reference.low_latency_combine(ys, w.topk_idx, w.topk_weights, tokens_cap)[rank]


def _poison_unused_rows(y: torch.Tensor, recv_count: torch.Tensor) -> torch.Tensor:
    y = y.clone()
    for i, n in enumerate(recv_count.tolist()):
        y[i, n:] = float("nan")
    return y


def _dense(t: torch.Tensor) -> torch.Tensor:
    # A column-major [n, 1] slice counts as contiguous yet has stride(-1) != 1, which a byte view refuses.
    return t.clone(memory_format=torch.contiguous_format)


def _check_dispatch(recv_x, recv_count, handle, want: dict, world: int, case_shape: tuple) -> None:
    """Valid rows of recv_x / scales / src_info, recv_count, layout_range and the handle's sizes."""
    tokens_cap, hidden, num_experts = case_shape
    experts, rows = num_experts // world, world * tokens_cap
    assert_bit_equal("recv_count", recv_count, want["recv_count"])
    assert_bit_equal("layout_range", handle[1], want["layout_range"])
    assert tuple(handle[2:]) == (tokens_cap, hidden, num_experts), f"handle sizes {tuple(handle[2:])}"
    data, scales = _split(recv_x)
    want_data, want_scales = _split(want["recv_x"])
    assert (scales is None) == (want_scales is None), "recv_x must be a tuple exactly when quantised"
    assert data.dtype == want_data.dtype and tuple(data.shape) == (experts, rows, hidden), (data.dtype, data.shape)
    src_info = handle[0]
    assert src_info.dtype == torch.int32 and tuple(src_info.shape) == (experts, rows)
    if scales is not None:
        assert scales.dtype == want_scales.dtype and scales.shape == want_scales.shape, (scales.dtype, scales.shape)
        if scales.dim() == 3:  # fp8: DeepEP's column-major [L, R*T, S]
            num_scales = scales.shape[2]
            assert scales.stride() == (rows * num_scales, 1, rows), f"scale strides {scales.stride()}"
            assert want_scales.stride() == scales.stride()
        else:  # int8: one scale per row
            assert tuple(scales.shape) == (experts, rows)
    for i, n in enumerate(want["recv_count"].tolist()):
        assert_bit_equal(f"recv_x[{i}, :{n}]", data[i, :n], want_data[i, :n])
        if scales is not None:
            assert_bit_equal(f"scales[{i}, :{n}]", _dense(scales[i, :n]), _dense(want_scales[i, :n]))
        assert_bit_equal(f"src_info[{i}, :{n}]", src_info[i, :n], want["src_info"][i, :n])


# ---------------------------------------------------------------------------------------------------------
# 1-4. One full round on every rank, compared with the executable spec.
# ---------------------------------------------------------------------------------------------------------
def _round(rank: int, world: int, case: dict) -> None:
    fmt = FORMATS[case["fmt"]]
    mode = case.get("mode", "sync")
    hidden, tokens_cap = fmt["hidden"], case.get("T", 8)
    w = _workload(world, case, hidden)
    num_experts = w.num_experts
    experts = num_experts // world
    x, idx, weights = w.x[rank], w.topk_idx[rank], w.topk_weights[rank]
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True, low_latency_quant=fmt["quant"])
    recv_stats = torch.zeros(experts, dtype=torch.int32)
    wait_stats = torch.zeros(world, dtype=torch.int64)

    recv_x, recv_count, handle = _dispatch(
        buffer,
        mode,
        x,
        idx,
        tokens_cap,
        num_experts,
        fmt,
        cumulative_local_expert_recv_stats=recv_stats,
        dispatch_wait_recv_cost_stats=wait_stats,
    )
    want_all = reference.low_latency_dispatch(
        w.x,
        w.topk_idx,
        tokens_cap,
        num_experts,
        use_fp8=fmt["use_fp8"],
        quant=fmt["quant"],
        round_scale=fmt["round_scale"],
        use_ue8m0=fmt["use_ue8m0"],
    )
    _check_dispatch(recv_x, recv_count, handle, want_all[rank], world, (tokens_cap, hidden, num_experts))
    assert_bit_equal("cumulative_local_expert_recv_stats", recv_stats, recv_count)
    first_wait = wait_stats.clone()
    assert bool((first_wait >= 0).all()), f"dispatch_wait_recv_cost_stats {first_wait.tolist()}"

    # Combine: expert outputs derived from what arrived; the spec gets the same function of its own rows.
    y = _poison_unused_rows(_expert_output(recv_x, rank), recv_count)
    ys = [_expert_output(o["recv_x"], d) for d, o in enumerate(want_all)]
    want = reference.low_latency_combine(ys, w.topk_idx, w.topk_weights, tokens_cap)[rank]
    assert_bit_equal("combined_x", _combine(buffer, mode, y, idx, weights, handle), want)

    # zero_copy reads get_next_low_latency_combine_buffer(handle), not x (here zeros).
    staged = buffer.get_next_low_latency_combine_buffer(handle)
    assert staged.dtype == torch.bfloat16 and tuple(staged.shape) == (experts, world * tokens_cap, hidden)
    staged.copy_(y)
    combined = _combine(buffer, mode, torch.zeros_like(y), idx, weights, handle, zero_copy=True)
    assert_bit_equal("combined_x (zero_copy)", combined, want)

    # out= is written in place and returned.
    out = torch.full((x.shape[0], hidden), float("nan"), dtype=torch.bfloat16)
    combined = _combine(buffer, mode, y, idx, weights, handle, out=out)
    assert combined is out, "low_latency_combine(out=...) must return out"
    assert_bit_equal("combined_x (out=)", out, want)

    # A second dispatch: the same result, the stats accumulate.
    again_x, again_count, again_handle = _dispatch(
        buffer,
        mode,
        x,
        idx,
        tokens_cap,
        num_experts,
        fmt,
        cumulative_local_expert_recv_stats=recv_stats,
        dispatch_wait_recv_cost_stats=wait_stats,
    )
    _check_dispatch(again_x, again_count, again_handle, want_all[rank], world, (tokens_cap, hidden, num_experts))
    assert_bit_equal("cumulative_local_expert_recv_stats after two calls", recv_stats, recv_count * 2)
    assert bool((wait_stats >= first_wait).all()) and bool((wait_stats > first_wait).any()), (
        f"dispatch_wait_recv_cost_stats did not increase: {first_wait.tolist()} -> {wait_stats.tolist()}"
    )


# (world, format, experts_per_rank, topk, routing, mode, extra): every format at 2 and 4 ranks, some at 1, 3, 8;
# L = 1 and L > 1; hook and async completion (which must give the synchronous bits); int32 topk_idx.
_ROUNDS = [
    (1, "bf16", 3, 2, "uniform", "sync", {}),
    (1, "fp8", 2, 2, "sparse", "hook", {}),
    (2, "bf16", 3, 3, "uniform", "async", {}),
    (2, "fp8", 1, 2, "sparse", "hook", {}),
    (2, "fp8_round", 2, 3, "skewed", "sync", {}),
    (2, "fp8_ue8m0", 3, 4, "group_limited", "sync", {}),
    (2, "int8", 2, 3, "idle_rank", "sync", {}),
    (3, "int8", 2, 3, "uniform", "sync", {"int32": True}),
    (3, "fp8_ue8m0", 2, 3, "sparse", "hook", {}),
    (4, "bf16", 2, 4, "skewed", "sync", {}),
    (4, "fp8", 3, 3, "uniform", "sync", {}),
    (4, "fp8_round", 1, 2, "sparse", "async", {}),
    (4, "fp8_ue8m0", 2, 3, "idle_rank", "sync", {}),
    (4, "int8", 2, 4, "group_limited", "hook", {}),
    (8, "bf16", 2, 4, "uniform", "sync", {}),
    (8, "fp8_round", 2, 3, "sparse", "hook", {}),
]
ROUND_CASES = [
    pytest.param(
        world,
        dict(fmt=fmt, experts_per_rank=experts, topk=topk, routing=routing, mode=mode, seed=n, **extra),
        id=f"R{world}-{fmt}-L{experts}-K{topk}-{routing}-{mode}",
    )
    for n, (world, fmt, experts, topk, routing, mode, extra) in enumerate(_ROUNDS)
]


@pytest.mark.parametrize(("world", "case"), ROUND_CASES)
def test_reference_backend_matches_executable_spec(world: int, case: dict) -> None:
    run_ranks(world, _round, case)


# ---------------------------------------------------------------------------------------------------------
# 2. Hook rules.
# ---------------------------------------------------------------------------------------------------------
def _hook_rules(rank: int, world: int) -> None:
    fmt = FORMATS["bf16"]
    w = _workload(world, dict(experts_per_rank=2, topk=2, seed=60, routing="uniform", tokens=[4] * world), 16)
    x, idx, weights = w.x[rank], w.topk_idx[rank], w.topk_weights[rank]
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    recv_x, recv_count, handle = _dispatch(buffer, "sync", x, idx, 8, w.num_experts, fmt)
    y = _expert_output(recv_x, rank)
    want = _combine(buffer, "sync", y, idx, weights, handle)

    _, _, _, _, hook = buffer.low_latency_dispatch(x, idx, 8, w.num_experts, use_fp8=False, return_recv_hook=True)
    with pytest.raises(RuntimeError, match="hook"):
        buffer.low_latency_dispatch(x, idx, 8, w.num_experts, use_fp8=False)
    with pytest.raises(RuntimeError, match="hook"):
        buffer.low_latency_combine(y, idx, weights, handle)
    hook()
    combined, _, hook = buffer.low_latency_combine(y, idx, weights, handle, return_recv_hook=True)
    with pytest.raises(RuntimeError, match="hook"):
        buffer.low_latency_dispatch(x, idx, 8, w.num_experts, use_fp8=False)
    hook()
    assert_bit_equal("combined_x after the hook", combined, want)

    # Calling an older hook of the same op again must not clear the mark of a newer call whose hook has not run.
    _, _, _, _, older = buffer.low_latency_dispatch(x, idx, 8, w.num_experts, use_fp8=False, return_recv_hook=True)
    older()
    _, _, _, _, newer = buffer.low_latency_dispatch(x, idx, 8, w.num_experts, use_fp8=False, return_recv_hook=True)
    older()
    with pytest.raises(RuntimeError, match="hook of the previous low_latency_dispatch was not called"):
        buffer.low_latency_dispatch(x, idx, 8, w.num_experts, use_fp8=False)
    newer()

    with pytest.raises(ValueError, match="async_finish"):
        buffer.low_latency_dispatch(x, idx, 8, w.num_experts, use_fp8=False, async_finish=True, return_recv_hook=True)
    with pytest.raises(ValueError, match="async_finish"):
        buffer.low_latency_combine(y, idx, weights, handle, async_finish=True, return_recv_hook=True)
    again = _combine(buffer, "sync", y, idx, weights, handle)  # the buffer still works
    assert_bit_equal("combined_x after the errors", again, want)

    # A hook lost before it ran (an exception in user code, say): clean_low_latency_buffer finishes that
    # receive, and the next calls work (before, every later low-latency call raised for good).
    buffer.low_latency_dispatch(x, idx, 8, w.num_experts, use_fp8=False, return_recv_hook=True)
    buffer.clean_low_latency_buffer(8, 16, w.num_experts)
    recv_x, _, handle = _dispatch(buffer, "sync", x, idx, 8, w.num_experts, fmt)
    after_clean = _combine(buffer, "sync", _expert_output(recv_x, rank), idx, weights, handle)
    assert_bit_equal("combined_x after a lost hook and a clean", after_clean, want)


def test_hook_must_run_before_the_next_call() -> None:
    run_ranks(2, _hook_rules)


def _combine_order(rank: int, world: int) -> None:
    """SPEC 6.3 sums in k order, each product rounded (no FMA); data where any other order shows in bf16."""
    big, a = 2.0**24, 1.0 + 2.0**-23
    # Token 0 (from SPEC-order test of the executable spec): terms 2^24, 1, 1, -2^24 in k order sum to 0;
    # in expert or rank order to 2. Token 1: (1+2^-23)(1+2^-7) - the same product = 0 exactly; an FMA keeps
    # -2^-30. Token 2 selects nothing: zeros.
    idx = torch.tensor([[3, 0, 2, 1], [0, 1, -1, -1], [-1, -1, -1, -1]])
    weights = torch.tensor([[1.0, 1.0, 1.0, -1.0], [a, -a, 5.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    value = {(0, 0): 1.0, (1, 0): big, (2, 0): 1.0, (3, 0): big, (0, 1): 1.0 + 2.0**-7, (1, 1): 1.0 + 2.0**-7}
    x = torch.full((3, 8), float(rank), dtype=torch.bfloat16)
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    recv_x, recv_count, handle = _dispatch(buffer, "sync", x, idx, 4, 4, FORMATS["bf16"])
    y = torch.full_like(recv_x, float("nan"))
    for i, n in enumerate(recv_count.tolist()):
        for j in range(n):
            y[i, j] = value[(2 * rank + i, int(handle[0][i, j]))]
    combined = _combine(buffer, "sync", y, idx, weights, handle)
    want = torch.zeros(3, 8, dtype=torch.bfloat16)
    assert_bit_equal("combined_x", combined, want)


def test_combine_sums_in_k_order_without_fma() -> None:
    run_ranks(2, _combine_order)


# ---------------------------------------------------------------------------------------------------------
# 5. DeepEP test_low_latency-style self-describing data.
# ---------------------------------------------------------------------------------------------------------
def _self_describing(rank: int, world: int, fmt_name: str, experts_per_rank: int) -> None:
    fmt = FORMATS[fmt_name]
    hidden, tokens_cap = 256, 8
    case = dict(experts_per_rank=experts_per_rank, topk=min(3, experts_per_rank * world), seed=70 + world)
    w = _workload(world, dict(case, routing="uniform"), hidden)
    # x[s][t] = s, with the last 128 columns = t (one fp8 block each; exact through power-of-two scales).
    for s, n in enumerate(x.shape[0] for x in w.x):
        x = torch.full((n, hidden), float(s))
        x[:, -128:] = torch.arange(n, dtype=torch.float32).unsqueeze(1)
        w.x[s] = x.to(torch.bfloat16)
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    recv_x, recv_count, handle = _dispatch(buffer, "sync", w.x[rank], w.topk_idx[rank], tokens_cap, w.num_experts, fmt)
    received = _dequantize(recv_x)
    src_info, layout_range = handle[0], handle[1]
    for i in range(experts_per_rank):
        expert = rank * experts_per_rank + i
        begin = 0
        for s in range(world):
            # One message per (t, k) with topk_idx == expert; experts are distinct per token, so one per t.
            tokens = [t for t, row in enumerate(w.topk_idx[s].tolist()) if expert in row]
            packed = int(layout_range[i, s])
            assert (packed >> 32, packed & 0xFFFFFFFF) == (begin, len(tokens)), (i, s, packed)
            rows = received[i, begin : begin + len(tokens)]
            assert bool((rows[:, :-128] == s).all()), f"expert {i}: rows from rank {s} do not carry {s}"
            got_tokens = src_info[i, begin : begin + len(tokens)].tolist()
            assert got_tokens == tokens, f"expert {i}, source {s}: src_info {got_tokens} != {tokens}"
            assert bool((rows[:, -128:] == torch.tensor(tokens, dtype=torch.float32).unsqueeze(1)).all())
            begin += len(tokens)
        assert int(recv_count[i]) == begin

    # Expert output = the received x: combine gives x * (sum of valid weights), by the SPEC 6.3 formula.
    y = received.to(torch.bfloat16)
    combined = _combine(buffer, "sync", y, w.topk_idx[rank], w.topk_weights[rank], handle)
    x, idx, weights = w.x[rank].float(), w.topk_idx[rank], w.topk_weights[rank]
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        acc = torch.zeros(hidden)
        for k in range(idx.shape[1]):
            if int(idx[t, k]) >= 0:
                acc = acc + weights[t, k] * x[t]
        want[t] = acc
    assert_bit_equal("combined_x", combined, want.to(torch.bfloat16))
    weight_sum = torch.where(idx >= 0, weights, 0.0).sum(1, keepdim=True)
    # ... which is x * sum(valid weights) up to rounding (the final bf16 cast alone is within 2^-9 relative).
    ideal = x * weight_sum
    assert bool(((combined.float() - ideal).abs() <= ideal.abs() * 2**-8).all()), "combine != x * sum(weights)"


@pytest.mark.parametrize(("world", "fmt", "experts_per_rank"), [(2, "bf16", 3), (4, "fp8_round", 2)])
def test_self_describing(world: int, fmt: str, experts_per_rank: int) -> None:
    run_ranks(world, _self_describing, fmt, experts_per_rank)


# ---------------------------------------------------------------------------------------------------------
# 6. Arguments that must agree across ranks.
# ---------------------------------------------------------------------------------------------------------
def _mismatch(rank: int, world: int, fields: list[str]) -> None:
    fmt = FORMATS["fp8"]
    w = _workload(world, dict(experts_per_rank=2, topk=2, seed=80, routing="uniform", tokens=[3] * world), 128)
    x, idx, weights = w.x[rank], w.topk_idx[rank], w.topk_weights[rank]
    want_all, want_combined = _spec_round(w, rank, 4)
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    odd = rank == world - 1  # one rank passes something else; every rank must raise
    for field in fields:
        if field == "op":
            _, _, handle = _dispatch(buffer, "sync", x, idx, 4, w.num_experts, fmt)
            with pytest.raises(CollectiveMismatchError, match="different operations"):
                if odd:
                    y = torch.zeros(2, world * 4, 128, dtype=torch.bfloat16)
                    buffer.low_latency_combine(y, idx, weights, handle)
                else:
                    buffer.low_latency_dispatch(x, idx, 4, w.num_experts)
        else:
            bad = dict(x=x, tokens_cap=4, num_experts=w.num_experts, use_fp8=True)
            if odd:
                bad.update(
                    {
                        "T": dict(tokens_cap=8),
                        "hidden": dict(x=torch.cat([x, x], dim=1)),
                        "num_experts": dict(num_experts=2 * w.num_experts),
                        "use_fp8": dict(use_fp8=False),
                    }[field]
                )
            with pytest.raises(CollectiveMismatchError, match=f"disagree.*{'num_max' if field == 'T' else field}"):
                buffer.low_latency_dispatch(
                    bad["x"], idx, bad["tokens_cap"], bad["num_experts"], use_fp8=bad["use_fp8"]
                )
        # The same Buffer then completes a correct round.
        recv_x, recv_count, handle = _dispatch(buffer, "sync", x, idx, 4, w.num_experts, fmt)
        _check_dispatch(recv_x, recv_count, handle, want_all[rank], world, (4, 128, w.num_experts))
        combined = _combine(buffer, "sync", _expert_output(recv_x, rank), idx, weights, handle)
        assert_bit_equal(f"combined_x after a {field} mismatch", combined, want_combined)


def test_collective_mismatch_raises_on_every_rank() -> None:
    run_ranks(3, _mismatch, ["T", "hidden", "num_experts", "use_fp8", "op"], timeout=60.0)


# ---------------------------------------------------------------------------------------------------------
# 7. Bad arguments raise before any communication; the Buffer stays usable.
# ---------------------------------------------------------------------------------------------------------
def _errors(rank: int, world: int) -> None:
    w = _workload(world, dict(experts_per_rank=2, topk=2, seed=90, routing="uniform", tokens=[4] * world), 128)
    num_experts = w.num_experts
    x, idx, weights = w.x[rank], w.topk_idx[rank], w.topk_weights[rank]

    normal = Buffer(dist.group.WORLD)
    with pytest.raises(ValueError, match="low_latency_mode"):
        normal.low_latency_dispatch(x, idx, 4, num_experts)

    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank"):
        buffer.low_latency_dispatch(x, idx, 3, num_experts)  # N = 4 > T = 3
    with pytest.raises(ValueError, match="round_scale"):
        buffer.low_latency_dispatch(x, idx, 4, num_experts, use_ue8m0=True)
    with pytest.raises(ValueError, match="hidden"):
        buffer.low_latency_dispatch(x[:, :64].contiguous(), idx, 4, num_experts)  # H % 128 != 0
    with pytest.raises(ValueError, match="hidden"):
        buffer.low_latency_dispatch(x, idx, 4, num_experts, round_scale=True, use_ue8m0=True)  # H % 512 != 0
    for bad_id in (num_experts, -2):
        bad_idx = idx.clone()
        bad_idx[0, 0] = bad_id
        with pytest.raises(ValueError, match="expert"):
            buffer.low_latency_dispatch(x, bad_idx, 4, num_experts)
    with pytest.raises(ValueError, match="num_experts"):
        buffer.low_latency_dispatch(x, idx, 4, num_experts + 1)  # not a multiple of the group size

    fmt = FORMATS["fp8"]
    recv_x, _, handle = _dispatch(buffer, "sync", x, idx, 4, num_experts, fmt)
    y = _expert_output(recv_x, rank)
    with pytest.raises(ValueError, match="zero_copy"):
        buffer.low_latency_combine(y, idx, weights, handle, zero_copy=True)  # the staging buffer was never asked for
    other = Buffer(dist.group.WORLD, low_latency_mode=True)
    with pytest.raises(ValueError, match="another Buffer"):
        other.low_latency_combine(y, idx, weights, handle)
    with pytest.raises(ValueError, match="another Buffer"):
        other.get_next_low_latency_combine_buffer(handle)

    layout = buffer.get_dispatch_layout(idx, num_experts)
    _, _, _, _, normal_handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=layout[0],
        num_tokens_per_rdma_rank=layout[1],
        is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2],
        topk_idx=idx,
        topk_weights=weights,
    )
    with pytest.raises(ValueError, match="normal-mode"):
        buffer.low_latency_combine(y, idx, weights, normal_handle)
    with pytest.raises(TypeError, match="handle"):
        buffer.low_latency_combine(y, idx, weights, tuple(handle))  # a plain tuple is not a handle

    # N = 0 with a topk_idx whose strides are (1, 0) (torch.where of an empty tensor): nothing to receive.
    empty_idx = torch.where(torch.rand(0, 1) < 0.5, -1, torch.zeros(0, 1, dtype=torch.int64))
    empty_x = torch.zeros(0, 128, dtype=torch.bfloat16)
    for fmt_name in ("bf16", "fp8"):
        recv_x, recv_count, handle = _dispatch(buffer, "sync", empty_x, empty_idx, 4, num_experts, FORMATS[fmt_name])
        assert recv_count.tolist() == [0] * (num_experts // world) and handle[1].abs().sum().item() == 0
        combined = _combine(buffer, "sync", _expert_output(recv_x, rank), empty_idx, torch.zeros(0, 1), handle)
        assert tuple(combined.shape) == (0, 128)

    # After all that, a correct round still matches the spec.
    want_all = reference.low_latency_dispatch(w.x, w.topk_idx, 4, num_experts)
    recv_x, recv_count, handle = _dispatch(buffer, "sync", x, idx, 4, num_experts, fmt)
    _check_dispatch(recv_x, recv_count, handle, want_all[rank], world, (4, 128, num_experts))
    ys = [_expert_output(o["recv_x"], d) for d, o in enumerate(want_all)]
    combined = _combine(buffer, "sync", _expert_output(recv_x, rank), idx, weights, handle)
    assert_bit_equal("combined_x", combined, reference.low_latency_combine(ys, w.topk_idx, w.topk_weights, 4)[rank])


def test_bad_arguments_raise() -> None:
    run_ranks(2, _errors, timeout=60.0)


def test_a_receive_that_failed_fails_again_instead_of_returning() -> None:
    """A hook or event waited on twice receives once; if that receive raised, a later wait must not return as
    though the outputs had been filled."""
    from deep_ep.utils import run_once

    calls = []

    def receive() -> None:
        calls.append(1)
        raise ValueError("the exchange failed")

    hook = run_once(receive)
    with pytest.raises(ValueError, match="the exchange failed"):
        hook()
    with pytest.raises(RuntimeError, match="this receive failed earlier .ValueError: the exchange failed."):
        hook()
    assert calls == [1]  # never run twice
    fine = run_once(lambda: calls.append(2))
    fine()
    fine()
    assert calls == [1, 2]


def _combine_ids_and_capture(rank: int, world: int) -> None:
    w = _workload(world, dict(experts_per_rank=2, topk=2, seed=61, routing="uniform", tokens=[4] * world), 16)
    x, idx, weights = w.x[rank], w.topk_idx[rank].clone(), w.topk_weights[rank]
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, 8, w.num_experts, use_fp8=False)
    y = _expert_output(recv_x, rank)
    # The caller's own CPU topk_idx rewritten in place after the dispatch is not the dispatched one any more.
    idx[0, 0] = next(e for e in range(w.num_experts) if e not in idx[0].tolist())
    with pytest.raises(ValueError, match="but the handle's dispatch sent"):
        buffer.low_latency_combine(y, idx, weights, handle)
    # Under CUDA-graph capture (stood for by the façade's host-sync switch) no wall time is added to either
    # statistic: a captured graph would replay the capture's figure.
    from deep_ep import buffer as facade

    dispatch_cost = torch.zeros(world, dtype=torch.int64)
    combine_cost = torch.zeros(world, dtype=torch.int64)
    idx = w.topk_idx[rank]
    allowed = facade.host_sync_allowed
    facade.host_sync_allowed = lambda device: False
    try:
        got = buffer.low_latency_dispatch(
            x, idx, 8, w.num_experts, use_fp8=False, dispatch_wait_recv_cost_stats=dispatch_cost
        )
        buffer.low_latency_combine(
            _expert_output(got[0], rank), idx, weights, got[2], combine_wait_recv_cost_stats=combine_cost
        )
    finally:
        facade.host_sync_allowed = allowed
    assert dispatch_cost.tolist() == [0] * world and combine_cost.tolist() == [0] * world


def test_combine_ids_are_the_dispatched_ones_and_capture_adds_no_wall_time() -> None:
    run_ranks(2, _combine_ids_and_capture)


class _ReceiveFails(ReferenceBackend):
    """The reference backend whose receive raises for a dispatch of 3 tokens: a backend failing in a receive."""

    name = "receive_fails"

    def low_latency_dispatch(self, args):
        out, route, pending = super().low_latency_dispatch(args)
        if args.x.shape[0] == 3:

            def fail() -> None:
                raise RuntimeError("the receive failed")

            pending = pending.then(fail)
        return out, route, pending


def _deferred_failures(rank: int, world: int) -> None:
    register_backend("receive_fails", _ReceiveFails)
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True, backend="receive_fails")
    x, ids = torch.randn(4, 16).bfloat16(), torch.zeros(4, 1, dtype=torch.long)
    # The failing call's event not yet waited: the next call goes on, and the failure is raised at that event.
    failing = buffer.low_latency_dispatch(x[:3], ids[:3], 4, 2 * world, use_fp8=False, async_finish=True)
    buffer.low_latency_dispatch(x, ids, 4, 2 * world, use_fp8=False)
    with pytest.raises(RuntimeError, match="the receive failed"):
        failing[3].current_stream_wait()
    # Waited on (and raised) first: the next call does not raise it again.
    failing = buffer.low_latency_dispatch(x[:3], ids[:3], 4, 2 * world, use_fp8=False, async_finish=True)
    with pytest.raises(RuntimeError, match="the receive failed"):
        failing[3].current_stream_wait()
    # Waited on again: it raises again instead of returning as if the outputs had been filled.
    with pytest.raises(RuntimeError, match="this receive failed earlier"):
        failing[3].current_stream_wait()
    assert not failing[3].event.is_complete
    recv_x, count, _, _, _ = buffer.low_latency_dispatch(x, ids, 4, 2 * world, use_fp8=False)
    assert int(count.sum()) == 4 * world * (rank == 0)  # every token went to expert 0, on rank 0


def test_a_deferred_receive_that_fails_raises_at_its_event_only() -> None:
    run_ranks(2, _deferred_failures)


def _no_selections(rank: int, world: int) -> None:
    # K = 0 with message rows that are not whole 4-byte words (bf16 H = 1; int8 H = 7): nothing is received.
    for quant, hidden in (("fp8", 1), ("int8", 7)):
        buffer = Buffer(dist.group.WORLD, low_latency_mode=True, low_latency_quant=quant)
        x, ids = torch.ones(2, hidden, dtype=torch.bfloat16), torch.empty(2, 0, dtype=torch.long)
        for use_fp8 in (False, True) if quant == "int8" else (False,):
            recv_x, count, handle, _, _ = buffer.low_latency_dispatch(x, ids, 4, 2 * world, use_fp8=use_fp8)
            assert count.tolist() == [0, 0]
            y = torch.zeros(2, world * 4, hidden, dtype=torch.bfloat16)
            combined = buffer.low_latency_combine(y, ids, torch.empty(2, 0), handle)[0]
            assert combined.shape == (2, hidden) and not combined.any()


def test_no_selections_with_rows_of_any_width() -> None:
    run_ranks(2, _no_selections)


def _bf16_ignores_scale_flags(rank: int, world: int) -> None:
    # SGLang's bf16 dispatch passes DeepEP's fp8 scale flags with use_fp8=False; DeepEP ignores them there.
    w = _workload(world, dict(experts_per_rank=2, topk=2, seed=62, routing="uniform", tokens=[4] * world), 512)
    x, idx, weights = w.x[rank], w.topk_idx[rank], w.topk_weights[rank]
    want_all, want_combined = _spec_round(w, rank, 8, use_fp8=False)
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    flags = dict(round_scale=True, use_ue8m0=True) if rank == 0 else {}  # differing in them is no mismatch
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, idx, 8, w.num_experts, use_fp8=False, **flags)
    _check_dispatch(recv_x, recv_count, handle, want_all[rank], world, (8, 512, w.num_experts))
    combined = _combine(buffer, "sync", _expert_output(recv_x, rank), idx, weights, handle)
    assert_bit_equal("combined_x after a bf16 dispatch with scale flags", combined, want_combined)
    int8 = Buffer(dist.group.WORLD, low_latency_mode=True, low_latency_quant="int8")
    with pytest.raises(ValueError, match="fp8 format only"):  # int8 has no power-of-two scales to round to
        int8.low_latency_dispatch(x, idx, 8, w.num_experts, round_scale=True)


def test_bf16_dispatch_ignores_fp8_scale_flags_as_deepep() -> None:
    run_ranks(2, _bf16_ignores_scale_flags)


def _staging_survives_clean(rank: int, world: int) -> None:
    w = _workload(world, dict(experts_per_rank=2, topk=2, seed=63, routing="uniform", tokens=[4] * world), 16)
    x, idx, weights = w.x[rank], w.topk_idx[rank], w.topk_weights[rank]
    _, want = _spec_round(w, rank, 8, use_fp8=False)
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    recv_x, recv_count, handle = _dispatch(buffer, "sync", x, idx, 8, w.num_experts, FORMATS["bf16"])
    # A staging tensor obtained before clean_low_latency_buffer (DeepEP's clean leaves the staging data alone),
    # asked for again by other code after the clean, then filled: zero_copy reads what was written into it.
    staged = buffer.get_next_low_latency_combine_buffer(handle)
    buffer.clean_low_latency_buffer(8, 16, w.num_experts)
    assert buffer.get_next_low_latency_combine_buffer(handle) is staged
    staged.copy_(_poison_unused_rows(_expert_output(recv_x, rank), recv_count))
    combined = _combine(buffer, "sync", torch.zeros_like(staged), idx, weights, handle, zero_copy=True)
    assert_bit_equal("combined_x (zero_copy, staged before a clean)", combined, want)


def test_zero_copy_staging_survives_clean_low_latency_buffer() -> None:
    run_ranks(2, _staging_survives_clean)


# ---- finding (review, twenty-sixth session): a hook referred to itself and its Buffer, a reference cycle that kept a
# dropped Buffer (its host board's mapping and descriptors) alive until the next cyclic garbage collection
def _dropped_with_hooks(rank: int, world: int) -> list[bool]:
    x, ids, weights = torch.ones(2, 16, dtype=torch.bfloat16), torch.tensor([[0], [1]]), torch.ones(2, 1)
    alive = []
    gc.disable()  # as training loops that collect by hand: nothing but reference counts frees the Buffer
    try:
        for called in (True, False):
            buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
            recv, _, handle, _, hook = buffer.low_latency_dispatch(
                x, ids, 4, 2 * world, use_fp8=False, return_recv_hook=True
            )
            hook()
            combined, _, hook = buffer.low_latency_combine(recv, ids, weights, handle, return_recv_hook=True)
            if called:
                hook()
            else:
                buffer.clean_low_latency_buffer(4, 16, 2 * world)  # takes the lost receive
            owner = weakref.ref(buffer)
            del buffer, recv, handle, hook, combined
            alive.append(owner() is not None)
    finally:
        gc.enable()
    return alive


def test_a_buffer_whose_calls_returned_hooks_is_freed_when_dropped() -> None:
    assert run_ranks(2, _dropped_with_hooks, timeout=60) == [[False, False]] * 2
