"""The ranks' calls keep pairing up after an error that only some ranks see (SPEC 8, README "Errors"): a rank
that rejects its own arguments, a rank that arrives after its peers gave up, ranks passing different handles
or dtypes. Every round after the error uses data unique to that round, so a call paired with another round's
call on a peer would return the other round's rows and fail the comparison with the executable spec."""

from __future__ import annotations

import time

import pytest
import torch
from test_reliability import EXPERTS_PER_RANK, Ctx

import reference
from deep_ep import CollectiveMismatchError, CommTimeoutError
from deep_ep import autograd as ep
from deep_ep.testing import run_ranks
from deep_ep.testing.compare import assert_bit_equal

TIMEOUT_S = 20.0  # a peer that waits for a call that never pairs fails the test within this, not after 300 s


def _round(c: Ctx, step: int) -> None:
    """Dispatch, cached dispatch, combine and a low-latency dispatch + combine of x scaled by `step + 2`,
    compared with the executable spec bit for bit."""
    xs = [x * (step + 2) for x in c.w.x]
    lay = reference.layout(c.w.topk_idx, c.experts)
    in_ranks = [q["is_token_in_rank"] for q in lay]
    spec = reference.dispatch(
        xs, in_ranks, [q["num_tokens_per_expert"] for q in lay], c.w.topk_idx, c.w.topk_weights, c.experts
    )
    recv_x, _, _, _, handle, _ = c.dispatch(x=xs[c.rank])
    assert_bit_equal(f"recv_x of round {step}", recv_x, spec[c.rank]["recv_x"])
    again = c.buffer.dispatch(xs[c.rank], handle=handle)[0]
    assert_bit_equal(f"cached recv_x of round {step}", again, spec[c.rank]["recv_x"])
    combined, _, _ = c.buffer.combine(recv_x, handle)
    want = reference.combine([s["recv_x"] for s in spec], in_ranks)[c.rank]["combined_x"]
    assert_bit_equal(f"combined_x of round {step}", combined, want)
    recv, count, ll_handle, _, _ = c.ll_dispatch(x=xs[c.rank], use_fp8=False)
    ll_spec = reference.low_latency_dispatch(xs, c.w.topk_idx, 8, c.experts, use_fp8=False)
    want_recv = ll_spec[c.rank]["recv_x"]
    assert_bit_equal(f"ll recv_count of round {step}", count, ll_spec[c.rank]["recv_count"])
    for expert, rows in enumerate(count.tolist()):  # rows past the count are unspecified
        assert_bit_equal(f"ll recv_x of round {step}", recv[expert, :rows], want_recv[expert, :rows])
    out, _, _ = c.buffer.low_latency_combine(recv, c.idx, c.weights, ll_handle)
    ll_want = reference.low_latency_combine([s["recv_x"] for s in ll_spec], c.w.topk_idx, c.w.topk_weights, 8)
    assert_bit_equal(f"ll combined_x of round {step}", out, ll_want[c.rank])


# ---- a rank that rejects its own arguments --------------------------------------------------------------

REJECTIONS = {
    # op: (the last rank's bad call, its exception)
    "dispatch": (lambda c: c.dispatch(topk_weights=c.weights.double()), TypeError),
    "cached_dispatch": (lambda c: c.buffer.dispatch(c.x[:-1], handle=c.handle), ValueError),
    "combine": (lambda c: c.combine(bias=c.x[:-1]), ValueError),
    "low_latency_dispatch": (lambda c: c.ll_dispatch(num_max_dispatch_tokens_per_rank=2), ValueError),
    "low_latency_combine": (lambda c: c.ll_combine(topk_weights=c.weights.half()), TypeError),
}
VALID = {
    "dispatch": lambda c: c.dispatch(),
    "cached_dispatch": lambda c: c.buffer.dispatch(c.x, handle=c.handle),
    "combine": lambda c: c.combine(),
    "low_latency_dispatch": lambda c: c.ll_dispatch(),
    "low_latency_combine": lambda c: c.ll_combine(),
}


def _last_rank_differs(rank: int, world: int, table: str, key: str) -> str:
    """The last rank makes the call of `table`'s entry `key` that it rejects (or that differs), the others the
    valid one: each must raise (the others CollectiveMismatchError), then two rounds must pair and match."""
    c = Ctx(rank, world)
    c.buffer.comm_timeout = TIMEOUT_S
    last, error, others = DIFFERING_CALLS[table][key][:3]
    with pytest.raises(error if rank == world - 1 else CollectiveMismatchError) as info:
        (last if rank == world - 1 else others)(c)
    _round(c, 1)
    _round(c, 2)
    return str(info.value)


@pytest.mark.parametrize("op", sorted(REJECTIONS))
def test_a_rank_that_rejects_its_arguments_fails_the_call_on_every_rank(op: str) -> None:
    messages = run_ranks(3, _last_rank_differs, "buffer", op, timeout=120)
    assert all(f"{op}: rank(s) [2] rejected their arguments" in m for m in messages[:2]), messages


# ---- deep_ep.autograd: checks it makes before the Buffer's call, and its two-combine path --------------


def _bad_id(c: Ctx) -> torch.Tensor:
    idx = c.idx.clone()
    idx[0, 0] = c.experts
    return idx


AUTOGRAD_CALLS = {
    # case: (the last rank's call, its exception, the other ranks' call, their message)
    "dispatch, expert id out of range (the layout's check)": (
        lambda c: ep.dispatch(c.buffer, c.x, _bad_id(c), c.weights, c.experts),
        ValueError,
        lambda c: ep.dispatch(c.buffer, c.x, c.idx, c.weights, c.experts),
        "dispatch: rank(s) [2] rejected their arguments",
    ),
    "dispatch, topk_weights of another shape": (
        lambda c: ep.dispatch(c.buffer, c.x, c.idx, c.weights[:, :1], c.experts),
        ValueError,
        lambda c: ep.dispatch(c.buffer, c.x, c.idx, c.weights, c.experts),
        "dispatch: rank(s) [2] rejected their arguments",
    ),
    "combine, bias of the wrong kind": (
        lambda c: ep.combine(c.buffer, c.recv_x, c.handle, bias=[c.x]),
        TypeError,
        lambda c: ep.combine(c.buffer, c.recv_x, c.handle),
        "combine: rank(s) [2] rejected their arguments",
    ),
    "combine, float64 weights on one rank (two combines there), none elsewhere": (
        lambda c: ep.combine(c.buffer, c.recv_x, c.handle, topk_weights=c.recv_w.double()),
        CollectiveMismatchError,
        lambda c: ep.combine(c.buffer, c.recv_x, c.handle),
        "ranks called different operations",
    ),
}


DIFFERING_CALLS = {
    "buffer": {op: (bad, error, VALID[op]) for op, (bad, error) in REJECTIONS.items()},
    "autograd": AUTOGRAD_CALLS,
}


@pytest.mark.parametrize("case", sorted(AUTOGRAD_CALLS))
def test_autograd_calls_fail_on_every_rank_when_one_rank_differs(case: str) -> None:
    messages = run_ranks(3, _last_rank_differs, "autograd", case, timeout=120)
    assert all(AUTOGRAD_CALLS[case][3] in m for m in messages[:2]), messages


# ---- a rank that arrives after its peers gave up ---------------------------------------------------------


def _late_rank(rank: int, world: int) -> str:
    c = Ctx(rank, world)
    c.buffer.comm_timeout = 2.0
    if rank == world - 1:
        time.sleep(5.0)  # alive, only late: the others give up on this call first
    with pytest.raises(CommTimeoutError) as info:
        c.dispatch()
    c.buffer.comm_timeout = TIMEOUT_S
    _round(c, 1)
    return str(info.value)


def test_a_late_rank_finds_the_call_given_up_and_the_next_calls_pair() -> None:
    """Over the host board: the late rank raises too, and the next rounds pair correctly."""
    messages = run_ranks(2, _late_rank, timeout=120)
    assert "ranks [1] did not reach the call" in messages[0], messages
    assert "ranks [1] did not reach the call before ranks [0] gave up" in messages[1], messages


def _late_rank_over_the_group(rank: int, world: int) -> tuple[str, str]:
    c = Ctx(rank, world)
    c.buffer.comm_timeout = 2.0
    if rank == world - 1:
        time.sleep(5.0)
    started = time.monotonic()
    with pytest.raises(CommTimeoutError) as first:
        c.dispatch()
    with pytest.raises(CommTimeoutError) as later:
        c.combine()
    assert time.monotonic() - started < 30
    return str(first.value), str(later.value)


def test_a_timeout_over_the_group_makes_the_buffer_refuse_later_calls() -> None:
    """Without the board a timed-out gloo collective may pair with a later one: every later call raises."""
    results = run_ranks(2, _late_rank_over_the_group, env={"DEEP_EP_HOST_BOARD": "0"}, timeout=120)
    assert all("this Buffer refuses every call" in later for _, later in results), results


# ---- ranks that pass different handles or dtypes ---------------------------------------------------------


def _different_handles(rank: int, world: int, op: str) -> str:
    c = Ctx(rank, world)
    c.buffer.comm_timeout = TIMEOUT_S
    second = c.dispatch(x=c.x * 2)
    handle = c.handle if rank == 0 else second[4]
    recv_x = c.recv_x if rank == 0 else second[0]
    with pytest.raises(CollectiveMismatchError) as info:
        if op == "combine":
            c.buffer.combine(recv_x, handle)
        else:
            c.buffer.dispatch(c.x, handle=handle)
    _round(c, 1)
    return str(info.value)


@pytest.mark.parametrize("op", ["cached_dispatch", "combine"])
def test_ranks_passing_handles_of_different_dispatches_raise(op: str) -> None:
    messages = run_ranks(2, _different_handles, op, timeout=120)
    assert all("handle_serial: rank 0=0, rank 1=2" in m for m in messages), messages


def _different_dtypes(rank: int, world: int, what: str) -> str:
    c = Ctx(rank, world)
    c.buffer.comm_timeout = TIMEOUT_S
    with pytest.raises(CollectiveMismatchError) as info:
        if what == "x_dtype":
            c.buffer.dispatch(c.x if rank == 0 else c.x.half(), handle=c.handle)
        elif what == "fp8_kind":  # dtypes outside agreement's table, once coded alike (equal character sums)
            c.dispatch(x=c.x.to(torch.float8_e4m3fnuz if rank == 0 else torch.float8_e5m2fnuz))
        else:
            scales = torch.ones(c.x.shape[0], 1, dtype=torch.float32 if rank == 0 else torch.int32)
            c.dispatch(x=(c.x, scales))
    _round(c, 1)
    return str(info.value)


@pytest.mark.parametrize("what", ["x_dtype", "fp8_kind", "scales_dtype"])
def test_ranks_passing_same_size_different_dtypes_raise(what: str) -> None:
    messages = run_ranks(2, _different_dtypes, what, timeout=120)
    field = "x_dtype" if what == "fp8_kind" else what
    assert all(f"{field}: rank 0=" in m for m in messages), messages


# ---- a call with a handle before the dispatch's event or hook -----------------------------------------


def _handle_before_the_event(rank: int, world: int) -> None:
    c = Ctx(rank, world)
    recv_x, _, _, _, handle, event = c.dispatch(async_finish=True)
    combined, _, _ = c.buffer.combine(recv_x, handle)  # the dispatch's event not waited on yet
    event.current_stream_wait()
    assert_bit_equal("combined_x", combined, c.buffer.combine(recv_x, handle)[0])
    stats = torch.zeros(EXPERTS_PER_RANK, dtype=torch.int32)
    recv, count, ll_handle, ll_event, _ = c.ll_dispatch(
        async_finish=True, cumulative_local_expert_recv_stats=stats, use_fp8=False
    )
    early, _, _ = c.buffer.low_latency_combine(recv, c.idx, c.weights, ll_handle)
    ll_event.current_stream_wait()
    late, _, _ = c.buffer.low_latency_combine(recv, c.idx, c.weights, ll_handle)
    assert_bit_equal("ll combined_x", early, late)
    assert_bit_equal("recv stats", stats, count)  # counted once, though completed twice


def test_a_call_with_a_handle_before_the_dispatch_event_sees_the_finished_dispatch() -> None:
    run_ranks(2, _handle_before_the_event, timeout=120)


def _hook_twice(rank: int, world: int) -> None:
    c = Ctx(rank, world)
    stats = torch.zeros(EXPERTS_PER_RANK, dtype=torch.int32)
    _, count, _, _, hook = c.ll_dispatch(return_recv_hook=True, cumulative_local_expert_recv_stats=stats)
    hook()
    hook()
    assert_bit_equal("recv stats", stats, count)


def test_a_receive_hook_called_twice_counts_once() -> None:
    run_ranks(2, _hook_twice, timeout=120)


def _weights_with_grad(rank: int, world: int) -> None:
    c = Ctx(rank, world)
    recv, _, handle, _, _ = c.ll_dispatch(use_fp8=False)
    want, _, _ = c.buffer.low_latency_combine(recv, c.idx, c.weights, handle)
    got, _, _ = c.buffer.low_latency_combine(recv.requires_grad_(), c.idx, c.weights.clone().requires_grad_(), handle)
    assert_bit_equal("combined_x", got, want)


def test_low_latency_combine_takes_tensors_that_require_grad() -> None:
    run_ranks(2, _weights_with_grad, timeout=120)
