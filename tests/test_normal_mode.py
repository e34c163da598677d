"""Reference backend == executable spec, bit for bit, on real gloo worlds (SPEC sections 3-5)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import reference
from deep_ep import Buffer, Config, UnsupportedFeatureError
from deep_ep.testing import run_ranks
from deep_ep.testing.compare import assert_bit_equal
from deep_ep.testing.workloads import make_workload


def _check_round(rank: int, world: int, case: dict) -> dict:
    """One full normal-mode round on this rank, every output compared with the executable spec."""
    experts = -(-case["experts"] // world) * world  # a multiple of the group size
    w = make_workload(
        world,
        case["tokens"],
        case["hidden"],
        case["topk"],
        experts,
        seed=case["seed"],
        routing=case["routing"],
        dtype=case.get("dtype", torch.bfloat16),
    )
    buffer = Buffer(dist.group.WORLD)
    if case.get("no_host_reads"):
        _forbid_host_reads()
    config = Config(case.get("num_sms", 20), 6, 256, 6, 128)
    channels = config.num_sms // 2
    worst = case.get("worst", 0)
    with_topk = case.get("with_topk", True)

    layouts = reference.layout(w.topk_idx, w.num_experts)
    got = buffer.get_dispatch_layout(w.topk_idx[rank], w.num_experts)
    for i, key in enumerate(
        ["num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert", "is_token_in_rank"]
    ):
        assert_bit_equal(f"layout.{key}", got[i], layouts[rank][key])
    per_rank, per_rdma, per_expert, in_rank, _ = got

    x_all = w.x
    if case.get("fp8_tuple"):  # (x_q, scales) with non-contiguous scales: travels unchanged
        x_all = [
            (
                x.float().to(torch.float8_e4m3fn),
                torch.randn(x.shape[1] // 4 or 1, x.shape[0], generator=torch.Generator().manual_seed(s)).t(),
            )
            for s, x in enumerate(w.x)
        ]
    kwargs = dict(topk_idx=w.topk_idx[rank], topk_weights=w.topk_weights[rank]) if with_topk else {}
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x_all[rank],
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        expert_alignment=case.get("align", 1),
        num_worst_tokens=worst,
        config=config,
        **kwargs,
    )
    expected = reference.dispatch(
        x_all,
        [lay["is_token_in_rank"] for lay in layouts],
        [lay["num_tokens_per_expert"] for lay in layouts],
        w.topk_idx if with_topk else None,
        w.topk_weights if with_topk else None,
        w.num_experts,
        expert_alignment=case.get("align", 1),
        num_worst_tokens=worst,
        num_channels=channels,
    )[rank]
    assert_bit_equal("recv_x", recv_x, expected["recv_x"])
    assert_bit_equal("recv_topk_idx", recv_idx, expected["recv_topk_idx"])
    assert_bit_equal("recv_topk_weights", recv_w, expected["recv_topk_weights"])
    assert_bit_equal("num_recv_tokens_per_expert_list", counts, expected["num_recv_tokens_per_expert_list"])
    for i, key in enumerate(
        [
            "rank_prefix_matrix",
            "channel_prefix_matrix",
            "recv_channel_prefix_matrix",
            "recv_src_idx",
            "is_token_in_rank",
            "send_head",
        ]
    ):
        assert_bit_equal(f"handle[{i}] {key}", handle[i], expected[key])

    # Cached dispatch of another dtype (a gradient, say) follows the same routing.
    grads = [x.float() * 3 + 1 for x in w.x]
    cached, none1, none2, none3, none4, _ = buffer.dispatch(grads[rank], handle=handle)
    assert (none1, none2, none3, none4) == (None, None, None, None)
    routing = [lay["is_token_in_rank"] for lay in layouts]
    assert_bit_equal("cached recv_x", cached, reference.cached_dispatch(grads, routing, worst)[rank])

    # Combine: every rank's expert output = a function of what it received, with both biases and weights.
    outputs = [
        reference.dispatch(
            w.x,
            routing,
            [lay["num_tokens_per_expert"] for lay in layouts],
            w.topk_idx,
            w.topk_weights,
            w.num_experts,
            num_worst_tokens=worst,
            num_channels=channels,
        )
    ]
    expert_out = [(o["recv_x"].float() * 1.5 - 0.25).to(torch.bfloat16) for o in outputs[0]]
    returned_w = [o["recv_topk_weights"] for o in outputs[0]]
    bias = [
        (
            torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + s)).to(torch.bfloat16),
            torch.randn(x.shape, generator=torch.Generator().manual_seed(200 + s)).to(torch.bfloat16),
        )
        for s, x in enumerate(w.x)
    ]
    nbias = case.get("bias", 2)
    my_bias = None if nbias == 0 else (bias[rank][0] if nbias == 1 else bias[rank])
    ref_bias = [None if nbias == 0 else (b[0] if nbias == 1 else b) for b in bias]
    if not with_topk or case.get("fp8_tuple"):
        return {"recv": int(recv_x[0].shape[0] if isinstance(recv_x, tuple) else recv_x.shape[0])}
    my_out, my_w = expert_out[rank], returned_w[rank]
    if case.get("odd_offset"):  # contiguous views one element into their storage (a slice of a flat buffer)
        my_out, my_w = _one_element_in(my_out), _one_element_in(my_w)
    combined, combined_w, _ = buffer.combine(my_out, handle, topk_weights=my_w, bias=my_bias)
    want = reference.combine(expert_out, routing, returned_w, ref_bias)[rank]
    assert_bit_equal("combined_x", combined, want["combined_x"])
    assert_bit_equal("combined_topk_weights", combined_w, want["combined_topk_weights"])
    return {"recv": int(recv_x.shape[0])}


def _one_element_in(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` that starts one element into its storage, so its bytes are not 8-byte aligned."""
    flat = torch.zeros(t.numel() + 1, dtype=t.dtype)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


def _forbid_host_reads() -> None:
    """Emulate CUDA-graph capture for this rank's process: every place that asks whether the host may read device
    data (agreement, input checks, the count exchange) is told no, so the dispatch runs its capture path (counts
    kept on the device, a padded route) on the CPU, where the spec can check it."""
    import deep_ep.backends.reference
    import deep_ep.buffer
    import deep_ep.comm

    for module in (deep_ep.comm, deep_ep.buffer, deep_ep.backends.reference):
        module.host_sync_allowed = lambda device: False


CASES = {
    "uniform": dict(tokens=12, hidden=32, topk=3, experts=8, routing="uniform", seed=1),
    "skewed": dict(tokens=16, hidden=16, topk=2, experts=8, routing="skewed", seed=2, align=4),
    "sparse": dict(tokens=9, hidden=8, topk=4, experts=16, routing="sparse", seed=3, bias=1),
    "idle_rank": dict(tokens=7, hidden=24, topk=2, experts=8, routing="idle_rank", seed=4, bias=0),
    "group_limited": dict(tokens=10, hidden=16, topk=3, experts=16, routing="group_limited", seed=5),
    "k1": dict(tokens=5, hidden=8, topk=1, experts=8, routing="uniform", seed=6),
    "empty": dict(tokens=0, hidden=8, topk=2, experts=8, routing="uniform", seed=7),
    "fp32": dict(tokens=6, hidden=8, topk=2, experts=8, routing="uniform", seed=8, dtype=torch.float32),
    "worst": dict(tokens=8, hidden=16, topk=2, experts=8, routing="uniform", seed=9, worst=40),
    "worst_no_host_reads": dict(
        tokens=8, hidden=16, topk=2, experts=8, routing="skewed", seed=14, worst=40, no_host_reads=True
    ),
    "worst_odd_offset": dict(
        tokens=8, hidden=12, topk=2, experts=8, routing="uniform", seed=15, worst=40, odd_offset=True
    ),
    "no_topk": dict(tokens=6, hidden=8, topk=2, experts=8, routing="uniform", seed=10, with_topk=False),
    "fp8_tuple": dict(tokens=6, hidden=16, topk=2, experts=8, routing="uniform", seed=11, fp8_tuple=True),
    "few_channels": dict(tokens=11, hidden=8, topk=2, experts=8, routing="uniform", seed=12, num_sms=6),
}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_backend_matches_executable_spec(world: int, name: str) -> None:
    run_ranks(world, _check_round, CASES[name])


@pytest.mark.parametrize("name", ["uniform", "sparse", "worst", "idle_rank"])
def test_eight_ranks(name: str) -> None:
    case = dict(CASES[name], experts=16)
    run_ranks(8, _check_round, case)


def _dispatch_without_host_reads(rank: int, world: int) -> str:
    w = make_workload(world, 4, 8, 2, 4 * world, seed=15)
    buffer = Buffer(dist.group.WORLD)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(w.topk_idx[rank], w.num_experts)
    _forbid_host_reads()
    with pytest.raises(UnsupportedFeatureError, match="needs num_worst_tokens > 0") as info:
        buffer.dispatch(w.x[rank], None, per_rank, None, in_rank, per_expert, w.topk_idx[rank], w.topk_weights[rank])
    return str(info.value)


def test_dispatch_that_may_not_read_the_host_needs_num_worst_tokens() -> None:
    assert len(run_ranks(2, _dispatch_without_host_reads)) == 2


def test_uneven_token_counts() -> None:
    run_ranks(3, _check_round, dict(tokens=[5, 0, 9], hidden=8, topk=2, experts=6, routing="uniform", seed=13))


def _self_describing(rank: int, world: int, tokens: list[int]) -> None:
    """DeepEP test_intranode style: x[t] = source rank everywhere but the last column, which holds t.
    Every received row must name its own origin, in SPEC order, and combine must give x * |D(t)|."""
    experts = 4 * world
    w = make_workload(world, tokens, 32, 3, experts, seed=31, routing="sparse", self_describing=True)
    buffer = Buffer(dist.group.WORLD)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(w.topk_idx[rank], experts)
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
        w.x[rank],
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=w.topk_idx[rank],
        topk_weights=w.topk_weights[rank],
    )
    rank_prefix, recv_src_idx = handle[0], handle[3]
    sources = recv_x[:, 0].long()
    token_ids = recv_x[:, -1].long()
    # Rows come grouped by source rank ascending, with rank_prefix_matrix[:, rank] as block ends.
    begin = 0
    for s in range(world):
        end = int(rank_prefix[s, rank])
        assert (sources[begin:end] == s).all(), f"rows {begin}:{end} should come from rank {s}"
        ids = token_ids[begin:end]
        assert (ids[1:] > ids[:-1]).all(), "tokens of one source must be ascending"
        expected_ids = (w.topk_idx[s] // (experts // world) == rank).any(1).nonzero().flatten()
        assert torch.equal(ids, expected_ids)
        begin = end
    assert begin == recv_x.shape[0] and torch.equal(recv_src_idx.long(), token_ids)
    # recv_topk_idx names local experts of exactly the entries that belong here.
    for i in range(recv_x.shape[0]):
        src_row = w.topk_idx[int(sources[i])][int(token_ids[i])]
        local = torch.where(src_row // (experts // world) == rank, src_row - rank * (experts // world), -1)
        local = torch.where(src_row >= 0, local, -1)
        assert torch.equal(recv_idx[i], local)
    # combine(dispatch(x), recv_topk_weights) reconstructs x * |D(t)| and topk_weights.
    combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
    fanout = in_rank.sum(1, keepdim=True).float()
    assert_bit_equal("combined x", combined, (w.x[rank].float() * fanout).to(torch.bfloat16))
    assert_bit_equal("combined weights", combined_w, w.topk_weights[rank])


@pytest.mark.parametrize("world,tokens", [(2, [6, 5]), (4, [7, 0, 3, 9]), (8, [3] * 8)])
def test_self_describing_rows_and_reconstruction(world: int, tokens: list[int]) -> None:
    run_ranks(world, _self_describing, tokens)


def _adjoint(rank: int, world: int) -> None:
    """Combine is the adjoint of dispatch: <combine(y), x> == <y, dispatch(x)> (float64, exact here)."""
    w = make_workload(world, 8, 4, 2, 2 * world, seed=41, dtype=torch.float64)
    buffer = Buffer(dist.group.WORLD)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(w.topk_idx[rank], w.num_experts)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        w.x[rank], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
    )
    y = torch.randn(recv_x.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    combined, _, _ = buffer.combine(y, handle)
    lhs = torch.tensor([(combined * w.x[rank]).sum().item()], dtype=torch.float64)
    rhs = torch.tensor([(y * recv_x).sum().item()], dtype=torch.float64)
    dist.all_reduce(lhs)
    dist.all_reduce(rhs)
    assert abs(lhs.item() - rhs.item()) <= 1e-12 * max(1.0, abs(lhs.item())), (lhs, rhs)


def test_combine_is_the_adjoint_of_dispatch() -> None:
    run_ranks(3, _adjoint)


def _combine_reads_values(rank: int, world: int) -> None:
    buffer = Buffer(dist.group.WORLD)
    experts, tokens, hidden, topk = 2 * world, 64, 8, 6
    idx = (torch.arange(topk) % experts).expand(tokens, topk).contiguous()  # every token to every rank
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    gen = torch.Generator().manual_seed(rank)
    x, weights = torch.randn(tokens, hidden, generator=gen), torch.rand(tokens, topk, generator=gen)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=weights, **layout)
    bias = torch.randn(tokens, hidden, generator=gen)
    want_x, want_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w, bias=bias)
    # Inputs that require grad (expert outputs made under grad mode): their values are combined, on every rank.
    got_x, got_w, _ = buffer.combine(
        recv_x.clone().requires_grad_(),
        handle,
        topk_weights=recv_w.clone().requires_grad_(),
        bias=(None, bias.clone().requires_grad_()),
    )
    assert_bit_equal("combined_x of inputs that require grad", got_x, want_x)
    assert_bit_equal("combined weights of inputs that require grad", got_w, want_w)
    assert got_x.grad_fn is None and got_w.grad_fn is None  # values, not a graph (deep_ep.autograd is the graph)
    # K = 0 (a dispatch without selections): the weights have no columns, nor does their combination.
    no_x, none, _ = buffer.combine(recv_x, handle, bias=bias)
    zero_x, zero_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w[:, :0], bias=bias)
    assert none is None and zero_w.shape == (tokens, 0) and zero_w.dtype == torch.float32
    assert_bit_equal("combined_x with K = 0 weights", zero_x, no_x)
    # A K = 0 dispatch of an fp8 tuple whose scales (three int32 words) leave the empty top-k field where no int64
    # view could start: the same rows as without top-k, and [num_recv, 0] selections.
    x_q, scales = x.to(torch.float8_e4m3fn), torch.arange(3 * tokens, dtype=torch.int32).view(tokens, 3)
    none_k = dict(topk_idx=idx[:, :0], topk_weights=weights[:, :0])
    (k0_x, k0_scales), k0_idx, k0_w, _, _, _ = buffer.dispatch((x_q, scales), **none_k, **layout)
    (plain_x, plain_scales), *_ = buffer.dispatch((x_q, scales), **layout)
    assert_bit_equal("K = 0 dispatch recv_x", k0_x, plain_x)
    assert_bit_equal("K = 0 dispatch recv_x_scales", k0_scales, plain_scales)
    assert k0_idx.shape == (plain_x.shape[0], 0) and k0_w.shape == (plain_x.shape[0], 0)


def test_combine_reads_values_of_inputs_that_require_grad() -> None:
    run_ranks(3, _combine_reads_values)


class _IntLike:
    """An integer type that is not int, as numpy's integers are (pybind11, hence DeepEP, takes them via __index__)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def _int_like_integers(rank: int, world: int) -> None:
    buffer = Buffer(dist.group.WORLD)
    idx = torch.tensor([[0, 1], [2, 3], [3, -1]])
    x, weights = torch.randn(3, 8, generator=torch.Generator().manual_seed(rank)), torch.rand(3, 2)
    results = []
    for experts, alignment in ((4, 4), (_IntLike(4), _IntLike(4))):
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, experts)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        results.append(buffer.dispatch(x, topk_idx=idx, topk_weights=weights, expert_alignment=alignment, **layout))
    assert_bit_equal("recv_x", results[1][0], results[0][0])
    assert results[1][3] == results[0][3] and all(type(n) is int for n in results[1][3])
    with pytest.raises(TypeError, match="num_experts must be an int, got float"):
        buffer.get_dispatch_layout(idx, 4.0)


def test_int_like_integers_are_taken_as_ints() -> None:
    run_ranks(2, _int_like_integers)
