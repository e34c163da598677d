"""Bad input, collective mismatches and dead peers (SPEC section 8): a clear error naming the argument, no
hang, and the same Buffer keeps producing correct results afterwards. docs/ERRORS.md lists these cases."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

import deep_ep
import reference
from deep_ep import Buffer, CollectiveMismatchError, CommTimeoutError, Config, UnsupportedFeatureError
from deep_ep.backends import register_backend
from deep_ep.backends.reference import ReferenceBackend
from deep_ep.testing import run_ranks
from deep_ep.testing.compare import assert_bit_equal
from deep_ep.testing.workloads import make_workload

EXPERTS_PER_RANK = 2


class Ctx:
    """One rank's buffers and a valid normal-mode and low-latency state to spoil one argument at a time."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.experts = EXPERTS_PER_RANK * world
        self.w = make_workload(world, 6, 128, 2, self.experts, seed=5)
        self.buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
        self.other = Buffer(dist.group.WORLD, low_latency_mode=True)
        self.x, self.idx, self.weights = self.w.x[rank], self.w.topk_idx[rank], self.w.topk_weights[rank]
        self.per_rank, _, self.per_expert, self.in_rank, _ = self.buffer.get_dispatch_layout(self.idx, self.experts)
        self.layout = dict(
            num_tokens_per_rank=self.per_rank, is_token_in_rank=self.in_rank, num_tokens_per_expert=self.per_expert
        )
        out = self.buffer.dispatch(self.x, topk_idx=self.idx, topk_weights=self.weights, **self.layout)
        self.recv_x, self.recv_w, self.handle = out[0], out[2], out[4]
        self.foreign_handle = self.other.dispatch(self.x, **self.layout)[4]
        _, _, self.ll_handle, _, _ = self.buffer.low_latency_dispatch(self.x, self.idx, 8, self.experts)

    def dispatch(self, **over):
        args = dict(topk_idx=self.idx, topk_weights=self.weights, **self.layout)
        args.update(over)
        return self.buffer.dispatch(over.pop("x", self.x), **{k: v for k, v in args.items() if k != "x"})

    def combine(self, **over):
        args = dict(x=self.recv_x, handle=self.handle)
        args.update(over)
        return self.buffer.combine(**args)

    def ll_dispatch(self, buffer=None, **over):
        args = dict(x=self.x, topk_idx=self.idx, num_max_dispatch_tokens_per_rank=8, num_experts=self.experts)
        args.update(over)
        return (buffer or self.buffer).low_latency_dispatch(**args)

    def ll_combine(self, **over):
        rows = self.world * 8
        args = dict(
            x=torch.zeros(EXPERTS_PER_RANK, rows, 128, dtype=torch.bfloat16),
            topk_idx=self.idx,
            topk_weights=self.weights,
            handle=self.ll_handle,
        )
        args.update(over)
        return self.buffer.low_latency_combine(**args)


def _bad_idx(c: Ctx, value: int) -> torch.Tensor:
    idx = c.idx.clone()
    idx[0, 0] = value
    return idx


# (case id, what is wrong, the call, the exception type, a fragment the message must contain)
CASES: list[tuple[str, str, Callable[[Ctx], object], type, str]] = [
    (
        "layout-idx-dtype",
        "topk_idx is float",
        lambda c: c.buffer.get_dispatch_layout(c.idx.float(), c.experts),
        TypeError,
        "topk_idx must have dtype",
    ),
    (
        "layout-idx-dim",
        "topk_idx is 1-D",
        lambda c: c.buffer.get_dispatch_layout(c.idx[:, 0], c.experts),
        ValueError,
        "topk_idx must be 2-D",
    ),
    (
        "layout-id-high",
        "expert id >= num_experts",
        lambda c: c.buffer.get_dispatch_layout(_bad_idx(c, c.experts), c.experts),
        ValueError,
        "is not an expert id",
    ),
    (
        "layout-id-low",
        "expert id < -1",
        lambda c: c.buffer.get_dispatch_layout(_bad_idx(c, -2), c.experts),
        ValueError,
        "is not an expert id",
    ),
    (
        "layout-experts-divisible",
        "num_experts % R != 0",
        lambda c: (
            c.buffer.get_dispatch_layout(c.idx, c.experts + 1)
            if c.world > 1
            else (_ for _ in ()).throw(ValueError("not divisible (trivial at R=1)"))
        ),
        ValueError,
        "divisible",
    ),
    (
        "layout-experts-zero",
        "num_experts = 0",
        lambda c: c.buffer.get_dispatch_layout(c.idx, 0),
        ValueError,
        "num_experts=0",
    ),
    ("dispatch-x-dim", "x is 1-D", lambda c: c.dispatch(x=c.x[0]), ValueError, "x must be 2-D"),
    ("dispatch-no-layout", "no layout and no handle", lambda c: c.buffer.dispatch(c.x), ValueError, "needs the layout"),
    (
        "dispatch-in-rank-dtype",
        "is_token_in_rank not bool",
        lambda c: c.dispatch(is_token_in_rank=c.in_rank.int()),
        TypeError,
        "is_token_in_rank must have dtype",
    ),
    (
        "dispatch-in-rank-shape",
        "is_token_in_rank wrong shape",
        lambda c: c.dispatch(is_token_in_rank=c.in_rank[:-1]),
        ValueError,
        "is_token_in_rank must have shape",
    ),
    (
        "dispatch-per-rank-shape",
        "num_tokens_per_rank wrong shape",
        lambda c: c.dispatch(num_tokens_per_rank=c.per_rank[:0]),
        ValueError,
        "num_tokens_per_rank must have shape",
    ),
    (
        "dispatch-layout-mismatch",
        "num_tokens_per_rank disagrees with is_token_in_rank",
        lambda c: c.dispatch(num_tokens_per_rank=c.per_rank + 1),
        ValueError,
        "does not match is_token_in_rank",
    ),
    (
        "dispatch-per-expert-divisible",
        "num_tokens_per_expert length not a multiple of R",
        lambda c: (
            c.dispatch(num_tokens_per_expert=c.per_expert[:1])
            if c.world > 1
            else (_ for _ in ()).throw(ValueError("not divisible (trivial at R=1)"))
        ),
        ValueError,
        "divisible",
    ),
    (
        "dispatch-idx-alone",
        "topk_idx without topk_weights",
        lambda c: c.dispatch(topk_weights=None),
        ValueError,
        "given together",
    ),
    (
        "dispatch-weights-dtype",
        "topk_weights float16",
        lambda c: c.dispatch(topk_weights=c.weights.half()),
        TypeError,
        "topk_weights must have dtype",
    ),
    (
        "dispatch-weights-shape",
        "topk_weights wrong shape",
        lambda c: c.dispatch(topk_weights=c.weights[:, :1]),
        ValueError,
        "topk_weights must have shape",
    ),
    (
        "dispatch-idx-range",
        "expert id out of range",
        lambda c: c.dispatch(topk_idx=_bad_idx(c, c.experts)),
        ValueError,
        "is not an expert id",
    ),
    (
        "dispatch-scales-rows",
        "x_scales rows differ from x",
        lambda c: c.dispatch(x=(c.x, torch.ones(1, 1))),
        ValueError,
        "x_scales has 1 rows",
    ),
    (
        "dispatch-alignment",
        "expert_alignment = 0",
        lambda c: c.dispatch(expert_alignment=0),
        ValueError,
        "expert_alignment=0",
    ),
    (
        "dispatch-hidden-zero",
        "x has no columns",
        lambda c: c.dispatch(x=c.x[:, :0]),
        ValueError,
        "x.shape[1]=0 must be >= 1",
    ),
    (
        "dispatch-worst-negative",
        "num_worst_tokens < 0",
        lambda c: c.dispatch(num_worst_tokens=-1),
        ValueError,
        "num_worst_tokens=-1",
    ),
    (
        "dispatch-worst-small",
        "num_worst_tokens below the received count (raised on every rank)",
        lambda c: c.dispatch(num_worst_tokens=1),
        ValueError,
        "smaller than the tokens received",
    ),
    (
        "dispatch-config-type",
        "config is not a Config",
        lambda c: c.dispatch(config=(20, 6)),
        TypeError,
        "config must be a deep_ep.Config",
    ),
    (
        "dispatch-config-sms",
        "config.num_sms = 0",
        lambda c: c.dispatch(config=Config(0, 6, 256, 6, 128)),
        ValueError,
        "num_sms=0",
    ),
    (
        "dispatch-device",
        "is_token_in_rank on another device",
        lambda c: c.dispatch(is_token_in_rank=c.in_rank.to("meta")),
        ValueError,
        "is on meta",
    ),
    (
        "cached-with-topk",
        "cached dispatch given topk_idx",
        lambda c: c.buffer.dispatch(c.x, handle=c.handle, topk_idx=c.idx),
        ValueError,
        "takes no topk_idx",
    ),
    (
        "cached-tokens",
        "cached dispatch with another N",
        lambda c: c.buffer.dispatch(c.x[1:], handle=c.handle),
        ValueError,
        "the handle routed",
    ),
    (
        "cached-foreign-handle",
        "handle from another Buffer",
        lambda c: c.buffer.dispatch(c.x, handle=c.foreign_handle),
        ValueError,
        "another Buffer",
    ),
    (
        "cached-plain-tuple",
        "handle is a plain tuple",
        lambda c: c.buffer.dispatch(c.x, handle=tuple(c.handle)),
        TypeError,
        "handle must be the handle",
    ),
    (
        "cached-worst",
        "cached num_worst_tokens differs from the handle's",
        lambda c: c.buffer.dispatch(c.x, handle=c.handle, num_worst_tokens=99),
        ValueError,
        "differs from the handle",
    ),
    (
        "combine-rows",
        "x rows differ from the received count",
        lambda c: c.combine(x=torch.cat([c.recv_x, c.recv_x])),
        ValueError,
        "rows but the handle's dispatch received",
    ),
    ("combine-dtype", "x is int32", lambda c: c.combine(x=c.recv_x.int()), TypeError, "x must have dtype"),
    (
        "combine-bias-shape",
        "bias wrong shape",
        lambda c: c.combine(bias=c.x[:1]),
        ValueError,
        "bias must have shape",
    ),
    (
        "combine-bias-dtype",
        "bias of another dtype",
        lambda c: c.combine(bias=(None, c.x.float())),
        TypeError,
        "bias[1] must have dtype",
    ),
    (
        "combine-bias-kind",
        "bias is a list of three",
        lambda c: c.combine(bias=[c.x, c.x, c.x]),
        TypeError,
        "bias must be None",
    ),
    (
        "combine-weights-shape",
        "topk_weights rows differ",
        lambda c: c.combine(topk_weights=c.recv_w[:0]),
        ValueError,
        "topk_weights must have shape",
    ),
    (
        "combine-config-sms",
        "config.num_sms = 0",
        lambda c: c.combine(config=Config(0, 6, 256, 6, 128)),
        ValueError,
        "num_sms=0",
    ),
    (
        "combine-hidden-zero",
        "x has no columns",
        lambda c: c.combine(x=c.recv_x[:, :0]),
        ValueError,
        "x.shape[1]=0 must be >= 1",
    ),
    (
        "combine-ll-handle",
        "low-latency handle passed to combine",
        lambda c: c.combine(handle=c.ll_handle),
        ValueError,
        "low-latency dispatch",
    ),
    (
        "event-comm-stream",
        "allocate_on_comm_stream without previous_event",
        lambda c: c.combine(allocate_on_comm_stream=True),
        ValueError,
        "allocate_on_comm_stream=True needs",
    ),
    (
        "event-type",
        "previous_event not an EventOverlap",
        lambda c: c.combine(previous_event=object()),
        TypeError,
        "previous_event must be an EventOverlap",
    ),
    (
        "ll-mode",
        "low-latency call on a normal-mode Buffer",
        lambda c: c.ll_dispatch(buffer=Buffer(dist.group.WORLD)),
        ValueError,
        "low_latency_mode=True",
    ),
    (
        "ll-too-many-tokens",
        "N > num_max_dispatch_tokens_per_rank",
        lambda c: c.ll_dispatch(num_max_dispatch_tokens_per_rank=2),
        ValueError,
        "more than num_max_dispatch",
    ),
    ("ll-x-dtype", "x is float32", lambda c: c.ll_dispatch(x=c.x.float()), TypeError, "x must have dtype"),
    (
        "ll-hidden-zero",
        "x has no columns",
        lambda c: c.ll_dispatch(x=c.x[:, :0]),
        ValueError,
        "x.shape[1]=0 must be >= 1",
    ),
    (
        "ll-ue8m0",
        "use_ue8m0 without round_scale",
        lambda c: c.ll_dispatch(use_ue8m0=True),
        ValueError,
        "use_ue8m0=True needs round_scale",
    ),
    (
        "ll-fp8-hidden",
        "fp8 with hidden % 128 != 0",
        lambda c: c.ll_dispatch(x=c.x[:, :96].contiguous()),
        ValueError,
        "multiple of 128",
    ),
    (
        "ll-hook-and-async",
        "async_finish and return_recv_hook",
        lambda c: c.ll_dispatch(async_finish=True, return_recv_hook=True),
        ValueError,
        "cannot both be set",
    ),
    (
        "ll-duplicate-experts",
        "a token selects one expert twice",
        lambda c: c.ll_dispatch(topk_idx=torch.zeros_like(c.idx)),
        ValueError,
        "selects one expert twice",
    ),
    (
        "ll-idx-range",
        "expert id out of range",
        lambda c: c.ll_dispatch(topk_idx=_bad_idx(c, c.experts)),
        ValueError,
        "is not an expert id",
    ),
    (
        "ll-stats-dtype",
        "cumulative_local_expert_recv_stats int64",
        lambda c: c.ll_dispatch(cumulative_local_expert_recv_stats=torch.zeros(EXPERTS_PER_RANK, dtype=torch.long)),
        TypeError,
        "cumulative_local_expert_recv_stats must have dtype",
    ),
    (
        "ll-combine-normal-handle",
        "normal-mode handle passed to low_latency_combine",
        lambda c: c.ll_combine(handle=c.handle),
        ValueError,
        "normal-mode dispatch",
    ),
    (
        "ll-combine-x-shape",
        "x of the wrong shape",
        lambda c: c.ll_combine(x=torch.zeros(1, 1, 128, dtype=torch.bfloat16)),
        ValueError,
        "x must have shape",
    ),
    (
        "ll-combine-tokens",
        "topk_idx with fewer tokens than the dispatch",
        lambda c: c.ll_combine(topk_idx=c.idx[:-1], topk_weights=c.weights[:-1]),
        ValueError,
        "pass the dispatched topk_idx",
    ),
    (
        "ll-combine-other-expert",
        "topk_idx is not the dispatched one (token 0's first choice replaced)",
        lambda c: c.ll_combine(topk_idx=_bad_idx(c, int(c.idx[0, 1]))),
        ValueError,
        "but the handle's dispatch sent",
    ),
    (
        "ll-combine-out",
        "out of the wrong shape",
        lambda c: c.ll_combine(out=torch.empty(1, 128, dtype=torch.bfloat16)),
        ValueError,
        "out must have shape",
    ),
    (
        "ll-combine-out-expanded",
        "out is an expanded tensor (one row for all)",
        lambda c: c.ll_combine(out=torch.zeros(1, 128, dtype=torch.bfloat16).expand(c.idx.shape[0], 128)),
        ValueError,
        "out is written in place, so its elements must not share memory",
    ),
    (
        "ll-combine-out-grad",
        "out requires grad",
        lambda c: c.ll_combine(out=torch.zeros(c.idx.shape[0], 128, dtype=torch.bfloat16, requires_grad=True)),
        ValueError,
        "out is written in place, so it must not require grad",
    ),
    (
        "ll-stats-expanded",
        "cumulative_local_expert_recv_stats is an expanded tensor",
        lambda c: c.ll_dispatch(
            cumulative_local_expert_recv_stats=torch.zeros(1, dtype=torch.int32).expand(EXPERTS_PER_RANK)
        ),
        ValueError,
        "cumulative_local_expert_recv_stats is written in place",
    ),
    (
        "ll-combine-logfmt",
        "use_logfmt=True",
        lambda c: c.ll_combine(use_logfmt=True),
        UnsupportedFeatureError,
        "use_logfmt",
    ),
    (
        "ll-combine-zero-copy",
        "zero_copy before get_next_low_latency_combine_buffer",
        lambda c: c.ll_combine(zero_copy=True),
        ValueError,
        "get_next_low_latency_combine_buffer",
    ),
    (
        "ctor-shrink",
        "enable_shrink=True",
        lambda c: Buffer(dist.group.WORLD, enable_shrink=True),
        UnsupportedFeatureError,
        "enable_shrink",
    ),
    (
        "ctor-backend",
        "unknown backend name",
        lambda c: Buffer(dist.group.WORLD, backend="nope"),
        ValueError,
        "registered backends",
    ),
    (
        "ctor-quant",
        "low_latency_quant='fp4'",
        lambda c: Buffer(dist.group.WORLD, low_latency_quant="fp4"),
        ValueError,
        "low_latency_quant",
    ),
    (
        "ctor-negative-bytes",
        "num_nvl_bytes < 0",
        lambda c: Buffer(dist.group.WORLD, -1),
        ValueError,
        "num_nvl_bytes=-1",
    ),
]


def _still_correct(c: Ctx) -> None:
    """After an error the same Buffer completes a full normal round and a low-latency round, exactly."""
    lay = reference.layout(c.w.topk_idx, c.experts)
    in_ranks = [q["is_token_in_rank"] for q in lay]
    spec = reference.dispatch(
        c.w.x, in_ranks, [q["num_tokens_per_expert"] for q in lay], c.w.topk_idx, c.w.topk_weights, c.experts
    )
    recv_x, _, recv_w, counts, handle, _ = c.dispatch()
    assert_bit_equal("recv_x after error", recv_x, spec[c.rank]["recv_x"])
    combined, _, _ = c.buffer.combine(recv_x, handle)
    want = reference.combine([s["recv_x"] for s in spec], in_ranks)[c.rank]["combined_x"]
    assert_bit_equal("combined after error", combined, want)
    got = c.ll_dispatch(use_fp8=False)
    ll_spec = reference.low_latency_dispatch(c.w.x, c.w.topk_idx, 8, c.experts, use_fp8=False)[c.rank]
    assert_bit_equal("ll recv_count after error", got[1], ll_spec["recv_count"])


def _run_cases(rank: int, world: int, names: list[str]) -> list[str]:
    c = Ctx(rank, world)
    seen = []
    for name, _, call, exc, fragment in CASES:
        if name not in names:
            continue
        with pytest.raises(exc, match=fragment.replace("(", r"\(").replace("[", r"\[")):
            call(c)
        _still_correct(c)
        seen.append(name)
    return seen


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_bad_input_raises_and_the_buffer_stays_usable(world: int) -> None:
    names = [case[0] for case in CASES]
    results = run_ranks(world, _run_cases, names, timeout=300)
    assert all(r == names for r in results)


def test_case_table_is_large_enough() -> None:
    assert len(CASES) >= 30 and len({case[0] for case in CASES}) == len(CASES)


def _mismatch(rank: int, world: int, what: str) -> str:
    c = Ctx(rank, world)
    with pytest.raises(CollectiveMismatchError) as info:
        if what == "hidden":
            c.dispatch(x=c.x[:, : 64 if rank == 0 else 128].contiguous())
        elif what == "op":
            c.combine() if rank == 0 else c.buffer.dispatch(c.x, handle=c.handle)
        elif what == "tokens_cap":
            c.ll_dispatch(num_max_dispatch_tokens_per_rank=8 + rank)
        elif what == "num_worst_tokens":
            c.dispatch(num_worst_tokens=40 + rank)
        elif what == "experts":
            c.ll_dispatch(num_experts=c.experts * (1 + rank))
        elif what == "device":
            # Tensors on a device other than the Buffer's on one rank only (a kernel backend would take its
            # fallback path there and its peer-memory path elsewhere): stood for by moving rank 1's Buffer.
            c.buffer.device = torch.device("meta") if rank == 1 else c.buffer.device
            try:
                c.dispatch()
            finally:
                c.buffer.device = torch.device("cpu")
    _still_correct(c)
    return str(info.value)


@pytest.mark.parametrize(
    "what,fragment",
    [
        ("hidden", "hidden: rank 0=64, rank 1=128"),
        ("op", "ranks called different operations"),
        ("tokens_cap", "num_max_dispatch_tokens_per_rank: rank 0=8, rank 1=9"),
        ("num_worst_tokens", "num_worst_tokens: rank 0=40, rank 1=41"),
        ("experts", "num_experts"),
        ("device", "on_buffer_device: rank 0=1, rank 1=0"),
    ],
)
def test_collective_mismatch_raises_on_every_rank(what: str, fragment: str) -> None:
    messages = run_ranks(2, _mismatch, what)
    assert all(fragment in m for m in messages), messages


def _one_rank_bad(rank: int, world: int, what: str) -> str:
    """Only the last rank passes bad data; every rank must raise (nobody left waiting) and stay usable."""
    c = Ctx(rank, world)
    over = {}
    if rank == world - 1:
        if what == "expert_id":
            over["topk_idx"] = _bad_idx(c, c.experts)
        else:
            over["num_tokens_per_rank"] = c.per_rank + 1
    with pytest.raises(ValueError) as info:
        c.dispatch(**over)
    _still_correct(c)
    return str(info.value)


@pytest.mark.parametrize("what,fragment", [("expert_id", "is not an expert id"), ("layout", "does not match")])
def test_bad_data_on_one_rank_raises_on_every_rank(what: str, fragment: str) -> None:
    messages = run_ranks(3, _one_rank_bad, what, timeout=120)
    assert fragment in messages[2], messages
    assert all("rank(s) [2] passed" in m for m in messages[:2]), messages


def _dead_peer(rank: int, world: int, op: str, how: str) -> str | None:
    c = Ctx(rank, world)
    c.buffer.comm_timeout = 3.0
    if rank == world - 1:  # this rank stops answering in the middle of `op`
        original = c.buffer._comm.all_to_all

        def stop(*args, **kwargs):
            if how == "exit":
                os._exit(0)
            time.sleep(60)
            return original(*args, **kwargs)

        c.buffer._comm.all_to_all = stop
    start = time.monotonic()
    with pytest.raises(CommTimeoutError, match=op) as info:
        if op == "dispatch":
            c.dispatch()
        else:
            c.combine()
    assert time.monotonic() - start < 30
    return str(info.value)


@pytest.mark.parametrize("op", ["dispatch", "combine"])
@pytest.mark.parametrize("how", ["exit", "stall"])
def test_dead_peer_raises_timeout_naming_the_op(op: str, how: str) -> None:
    messages = run_ranks(3, _dead_peer, op, how, doomed=(2,), timeout=90)
    assert all(m and op in m for m in messages[:2]), messages


# ---- finding (review, twenty-sixth session): a Buffer made again on a group where a wait had timed out took part in
# collectives that no longer paired up on every rank, and gloo aborted the process
def _buffer_again_after_a_group_timeout(rank: int, world: int) -> str:
    os.environ["DEEP_EP_COMM_TIMEOUT"] = "1" if rank == 0 else "3"
    os.environ["DEEP_EP_HOST_BOARD"] = "0"  # every exchange over the group
    if rank == 1:
        time.sleep(4.0)  # late for the first Buffer: rank 0's wait on the group times out
    with pytest.raises(CommTimeoutError, match="make a new process group"):
        Buffer(dist.group.WORLD)
    refused = ""
    if rank == 0:
        with pytest.raises(CommTimeoutError, match="no Buffer is made on it") as info:
            Buffer(dist.group.WORLD)  # before any collective: nothing to mispair
        refused = str(info.value)
    del os.environ["DEEP_EP_COMM_TIMEOUT"]
    buffer = Buffer(dist.new_group(list(range(world))))  # what the errors say to do
    x, idx = torch.ones(2, 16) * (rank + 1), torch.tensor([[0], [1]])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 2)
    recv_x, *_, handle, _ = buffer.dispatch(x, None, per_rank, None, in_rank, per_expert)
    assert torch.equal(buffer.combine(recv_x, handle)[0], x)
    return refused


def test_no_buffer_is_made_on_a_group_whose_wait_timed_out() -> None:
    messages = run_ranks(2, _buffer_again_after_a_group_timeout, timeout=90)
    assert "a wait on this group timed out before" in messages[0], messages


def test_public_error_types() -> None:
    assert issubclass(deep_ep.CollectiveMismatchError, ValueError)
    assert issubclass(deep_ep.CommTimeoutError, TimeoutError)


# ---- fuzzing: random shapes and one random corruption; only documented errors, never a wrong result ----

CORRUPTIONS = ["none", "id_high", "id_low", "weights_dtype", "idx_alone", "worst_small", "x_1d", "bias_shape"]


def _fuzz_case(rank: int, world: int, case: dict) -> str:
    experts = case["experts_per_rank"] * world
    w = make_workload(
        world,
        case["tokens"],
        case["hidden"],
        min(case["topk"], experts),
        experts,
        seed=case["seed"],
        routing=case["routing"],
    )
    buffer = Buffer(dist.group.WORLD)
    idx, weights, x = w.topk_idx[rank], w.topk_weights[rank], w.x[rank]
    bad = case["corruption"]
    if bad in ("id_high", "id_low") and idx.numel():
        idx = idx.clone()
        idx.view(-1)[0] = experts if bad == "id_high" else -2
    try:
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, experts)
        kwargs = dict(
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=weights.half() if bad == "weights_dtype" else weights,
        )
        if bad == "idx_alone":
            kwargs["topk_weights"] = None
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
            x.reshape(-1) if bad == "x_1d" else x, num_worst_tokens=1 if bad == "worst_small" else 0, **kwargs
        )
        bias = x[:1] if bad == "bias_shape" else None
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w, bias=bias)
    except (ValueError, TypeError) as error:
        return type(error).__name__
    lay = reference.layout(w.topk_idx, experts)
    in_ranks = [q["is_token_in_rank"] for q in lay]
    worst = 1 if bad == "worst_small" else 0
    per_expert_all = [q["num_tokens_per_expert"] for q in lay]
    spec = reference.dispatch(
        w.x, in_ranks, per_expert_all, w.topk_idx, w.topk_weights, experts, num_worst_tokens=worst
    )
    assert_bit_equal("recv_x", recv_x, spec[rank]["recv_x"])
    want = reference.combine([s["recv_x"] for s in spec], in_ranks, [s["recv_topk_weights"] for s in spec])[rank]
    assert_bit_equal("combined_x", combined, want["combined_x"])
    assert_bit_equal("combined_w", combined_w, want["combined_topk_weights"])
    return "ok"


def test_fuzzed_arguments_give_documented_errors_or_exact_results() -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(
        max_examples=20, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(
        world=st.sampled_from([1, 2, 3]),
        tokens=st.integers(0, 12),
        hidden=st.sampled_from([1, 8, 24]),
        topk=st.integers(1, 4),
        experts_per_rank=st.integers(1, 3),
        seed=st.integers(0, 1000),
        routing=st.sampled_from(["uniform", "sparse", "skewed", "idle_rank"]),
        corruption=st.sampled_from(CORRUPTIONS),
    )
    def check(world, tokens, hidden, topk, experts_per_rank, seed, routing, corruption):
        case = dict(
            tokens=tokens,
            hidden=hidden,
            topk=topk,
            experts_per_rank=experts_per_rank,
            seed=seed,
            routing=routing,
            corruption=corruption,
        )
        outcomes = run_ranks(world, _fuzz_case, case, timeout=60)
        assert len(set(outcomes)) == 1, outcomes  # every rank agrees: no rank left behind in a collective
        nothing_to_corrupt = tokens == 0 and corruption in ("id_high", "id_low", "bias_shape", "worst_small")
        if corruption == "worst_small":
            nothing_to_corrupt = outcomes[0] == "ok"  # fine only when no rank receives more than one token
        if corruption == "none" or nothing_to_corrupt:
            assert outcomes[0] == "ok", (case, outcomes)
        else:
            assert outcomes[0] in ("ValueError", "TypeError"), (case, outcomes)

    check()


class _ReferenceTwin(ReferenceBackend):
    """The reference backend under another name: a rank that picks it has picked another backend than its peers."""

    name = "reference_twin"


def _create_apart(rank: int, world: int, what: str) -> tuple[str, str]:
    """Buffer(...) where the last rank differs; every rank must raise at once (nobody waits in its first call),
    and a Buffer made afterwards with matching arguments must work."""
    register_backend("reference_twin", _ReferenceTwin)
    last = rank == world - 1
    arguments = {
        "bad_bytes": dict(num_nvl_bytes=-1 if last else 0),
        "backend": dict(backend="reference_twin" if last else "reference"),
        "mode": dict(low_latency_mode=last),
        "sizes": dict(num_nvl_bytes=1 << 20 if last else 1 << 21),
        "rdma": dict(num_rdma_bytes=1 << 20 if last else 0),
        "quant": dict(low_latency_quant="int8" if last else "fp8"),
        "destroy": dict(explicitly_destroy=last),  # destroy() is collective (found by review, twenty-sixth session)
    }[what]
    with pytest.raises((ValueError, CollectiveMismatchError)) as info:
        Buffer(dist.group.WORLD, **arguments)
    _still_correct(Ctx(rank, world))
    return type(info.value).__name__, str(info.value)


@pytest.mark.parametrize(
    "what,last_says,others_say",
    [
        ("bad_bytes", "num_nvl_bytes=-1 must be", "rank(s) [2] rejected their arguments"),
        ("backend", "backend: rank 0='reference', rank 1='reference', rank 2='reference_twin'", None),
        ("mode", "low_latency_mode: rank 0=0, rank 1=0, rank 2=1", None),
        ("sizes", "num_nvl_bytes: rank 0=2097152, rank 1=2097152, rank 2=1048576", None),
        ("rdma", "num_rdma_bytes: rank 0=0, rank 1=0, rank 2=1048576", None),
        ("quant", "low_latency_quant: rank 0='fp8', rank 1='fp8', rank 2='int8'", None),
        ("destroy", "explicitly_destroy: rank 0=0, rank 1=0, rank 2=1", None),
    ],
)
def test_buffers_created_apart_fail_on_every_rank(what: str, last_says: str, others_say: str | None) -> None:
    results = run_ranks(3, _create_apart, what, timeout=120)
    assert last_says in results[2][1], results
    assert all((others_say or last_says) in message for _, message in results[:2]), results
    assert all(kind == "CollectiveMismatchError" for kind, _ in results[: 2 if others_say else 3]), results
