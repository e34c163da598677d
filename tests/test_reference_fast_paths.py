"""The reference backend's fast paths == the executable spec, bit for bit, where the default suite's tiny shapes
do not reach them: host buffers reused across calls (large rows), the ordered sum in cache-sized token blocks,
the packed single transfer that a subclass with its own transport gets, and the fixed-size low-latency exchange
that GPUs run (forced on the CPU here).
"""

from __future__ import annotations

import pytest
import test_low_latency
import torch
import torch.distributed as dist

import reference
from deep_ep import Buffer
from deep_ep.backends import reference_low_latency
from deep_ep.backends.reference import (
    _few_runs,
    _host_prefix_matrices,
    _prefix_matrices,
    _sum_in_order,
    _sum_returned,
)
from deep_ep.kernels.ordered_sum import row_index_from_splits, torch_ordered_gather_sum
from deep_ep.packing import HostBuffers
from deep_ep.routing import Route
from deep_ep.testing import run_ranks
from deep_ep.testing.compare import assert_bit_equal
from deep_ep.testing.workloads import make_workload


# ---- DeepEP's prefix matrices -------------------------------------------------------------------------------
@pytest.mark.parametrize("num_ranks,num_channels", [(1, 1), (2, 3), (3, 12), (8, 10)])
def test_prefix_matrices_from_host_ints_equal_the_tensor_form(num_ranks: int, num_channels: int) -> None:
    # The fresh dispatch computes them on the host from the exchanged counts; CUDA-graph capture (no host read)
    # computes them with tensor operations. Random counts, every rank's view: the same values, shapes, dtype.
    g = torch.Generator().manual_seed(num_ranks * 100 + num_channels)
    per_channel = torch.randint(0, 50, (num_ranks, num_ranks, num_channels), generator=g, dtype=torch.int32)
    experts = torch.randint(0, 50, (num_ranks, 4 * num_ranks), generator=g, dtype=torch.int32)
    gathered = torch.cat([per_channel.sum(2), per_channel.reshape(num_ranks, -1), experts], dim=1)
    for rank in range(num_ranks):
        want = _prefix_matrices(gathered, rank, num_channels)
        got = _host_prefix_matrices(gathered.tolist(), rank, num_channels, torch.device("cpu"))
        assert len(got) == len(want) == 5
        for g_, w in zip(got, want):
            assert g_.dtype == torch.int32 and g_.shape == w.shape and torch.equal(g_, w.int()), (rank, g_, w)


# ---- HostBuffers ---------------------------------------------------------------------------------------------
def test_host_buffers_hand_out_a_storage_again_only_once_it_is_free() -> None:
    cache = HostBuffers()
    a = cache.empty((256, 1024), torch.bfloat16)
    assert a._base is None and a.is_contiguous() and a.shape == (256, 1024)
    b = cache.empty((256, 1024), torch.bfloat16)
    assert b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()  # a is still held
    view = a[3:5]
    ptr = a.untyped_storage().data_ptr()
    del a
    c = cache.empty((256, 1024), torch.bfloat16)
    assert c.untyped_storage().data_ptr() != ptr  # a view still holds it
    del view
    d = cache.empty((200, 1024), torch.float16)  # smaller and of another dtype: the same storage serves
    assert d.untyped_storage().data_ptr() == ptr and d.shape == (200, 1024) and d.dtype == torch.float16
    small = cache.empty((4, 4), torch.float32)  # below min_bytes: plain torch.empty
    assert small.untyped_storage().nbytes() == 64
    del b, c, d
    huge = cache.empty((1024, 1024), torch.float32)  # more than twice any free storage: a new one
    assert huge.untyped_storage().nbytes() >= 4 << 20


def test_host_buffers_forget_idle_storages_beyond_their_limits() -> None:
    cache = HostBuffers()
    cache.limit, cache.idle_bytes = 3, 3 << 20
    held = [cache.empty((1 << 20,), torch.uint8) for _ in range(5)]
    assert len(cache._storages) == 3  # in-use storages beyond the limit are forgotten, not freed
    del held
    cache.empty((2 << 20,), torch.uint8)
    assert len(cache._storages) <= 2 and sum(s.nbytes() for s in cache._storages) <= (3 << 20) + (3 << 20)


# ---- the ordered sum ---------------------------------------------------------------------------------------
def _sequential(terms: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = torch.zeros(terms[0].shape if terms else (0,), dtype=acc_dtype)  # +0.0, then one addition per term
    for term in terms:
        acc = acc + term.to(acc_dtype)
    return acc.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_sum_in_order_is_the_sequential_sum_from_plus_zero(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    # hidden 70000: float32 blocks of 7 tokens, so 20 tokens take several blocks (and a short last one).
    for num_tokens, hidden in [(0, 8), (1, 5), (20, 70000), (33, 17)]:
        for num_terms in range(6):
            rows = (torch.randn(num_tokens * 2 + 1, hidden, generator=gen) * 1e3).to(dtype)
            rows[rows.abs() < 300] = -0.0  # signed zeros: the sum must start from +0.0
            rows[-1] = 0  # the zero row of absent pairs
            plain = (torch.randn(num_tokens, hidden, generator=gen) * 1e3).to(dtype)
            plain[plain.abs() < 300] = -0.0
            terms, values = [], []
            for i in range(num_terms):
                if i % 2:
                    terms.append((plain, None))
                    values.append(plain)
                else:
                    index = torch.randint(0, rows.shape[0], (num_tokens,), generator=gen)
                    terms.append((rows, index))
                    values.append(rows[index])
            out = torch.full((num_tokens, hidden), float("nan"), dtype=dtype)
            _sum_in_order(terms, out, lambda size, dt, device: torch.empty(size, dtype=dt, device=device))
            want = _sequential(values, dtype) if values else torch.zeros(num_tokens, hidden, dtype=dtype)
            assert_bit_equal(f"sum of {num_terms} {dtype} terms, {num_tokens}x{hidden}", out, want)


def _dense_route(num_tokens: int, num_ranks: int, absent: int, gen: torch.Generator) -> Route:
    """An exact route (rank 0's view) where every token goes everywhere but `absent` random (token, rank) pairs."""
    in_rank = torch.ones(num_tokens, num_ranks, dtype=torch.bool)
    for _ in range(absent):
        in_rank[
            int(torch.randint(num_tokens, (1,), generator=gen)), int(torch.randint(num_ranks, (1,), generator=gen))
        ] = False
    counts = torch.zeros(num_ranks, num_ranks, dtype=torch.long)
    counts[0] = in_rank.sum(0)
    return Route.exact(in_rank, counts, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sum_returned_by_runs_and_by_gathers_give_the_same_bits(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(21)
    paths = set()
    for num_tokens, num_ranks, absent, hidden in [
        (40, 1, 0, 9),
        (64, 2, 3, 16),
        (64, 3, 5, 8),
        (80, 4, 2, 33),
        (30, 3, 40, 8),
    ]:
        route = _dense_route(num_tokens, num_ranks, absent, gen)
        total = route.send_tokens.shape[0]
        rows = (torch.randn(total + 1, hidden, generator=gen) * 1e3).to(dtype)
        rows[rows.abs() < 300] = -0.0
        rows[-1] = 0
        biases = tuple((torch.randn(num_tokens, hidden, generator=gen) * 1e3).to(dtype) for _ in range(2))
        paths.add(_few_runs(route))
        for nb in range(3):
            want = torch_ordered_gather_sum(
                rows[:-1], row_index_from_splits(route.send_tokens, route.send_splits, num_tokens), biases[:nb]
            )
            got = torch.empty_like(want)
            _sum_returned(route, rows.clone(), biases[:nb], got)
            assert_bit_equal(f"R={num_ranks} absent={absent} biases={nb}", got, want)
            for d, (begin, end) in enumerate(route.destination_blocks()):  # block d read from elsewhere
                # The same tokens seen from rank d, which received its own block after rows of lower sources.
                counts = torch.randint(0, 5, (num_ranks, num_ranks), generator=gen)
                counts[d] = torch.tensor(route.send_splits)
                seen_by_d = Route.exact(route.is_token_in_rank, counts, d)
                before = sum(counts[:d, d].tolist())
                received = torch.full((seen_by_d.num_recv, hidden), float("nan")).to(dtype)
                received[before : before + end - begin] = rows[begin:end]
                holed = rows.clone()
                holed[begin:end] = float("nan")
                got = torch.empty_like(want)
                _sum_returned(seen_by_d, holed, biases[:nb], got, own=(d, received))
                assert_bit_equal(f"R={num_ranks} absent={absent} biases={nb} own block {d}", got, want)
    assert paths == {True, False}  # runs of slices, and gathers


# ---- normal mode with rows large enough for the host buffers, every buffer reused -------------------------
def _large_rounds(rank: int, world: int) -> None:
    hidden, experts = 1024, 4 * world
    buffer = Buffer(dist.group.WORLD)
    kept = []
    for round_ in range(3):  # the same buffers come back each round; earlier results must stay intact
        w = make_workload(world, [96 + 16 * s for s in range(world)], hidden, 3, experts, seed=40 + round_)
        layouts = reference.layout(w.topk_idx, w.num_experts)
        routing = [lay["is_token_in_rank"] for lay in layouts]
        per_expert = [lay["num_tokens_per_expert"] for lay in layouts]
        lay = buffer.get_dispatch_layout(w.topk_idx[rank], w.num_experts)
        x_all = [
            (
                xs.float().to(torch.float8_e4m3fn),
                torch.rand(xs.shape[0], hidden // 128, generator=torch.Generator().manual_seed(100 * round_ + s)),
            )
            for s, xs in enumerate(w.x)
        ]
        recv, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
            x_all[rank],
            num_tokens_per_rank=lay[0],
            num_tokens_per_rdma_rank=lay[1],
            is_token_in_rank=lay[3],
            num_tokens_per_expert=lay[2],
            topk_idx=w.topk_idx[rank],
            topk_weights=w.topk_weights[rank],
        )
        want = reference.dispatch(x_all, routing, per_expert, w.topk_idx, w.topk_weights, w.num_experts)[rank]
        assert_bit_equal("recv_x (fp8, scales)", recv, want["recv_x"])
        assert_bit_equal("recv_topk_idx", recv_idx, want["recv_topk_idx"])
        assert_bit_equal("recv_topk_weights", recv_w, want["recv_topk_weights"])
        cached = buffer.dispatch(w.x[rank], handle=handle)[0]
        want_cached = reference.cached_dispatch(w.x, routing)[rank]
        assert_bit_equal("cached recv_x", cached, want_cached)
        y = (cached.float() * 0.5 + rank).to(torch.bfloat16)
        ys = [(c.float() * 0.5 + s).to(torch.bfloat16) for s, c in enumerate(reference.cached_dispatch(w.x, routing))]
        bias = (w.x[rank] * 2, w.x[rank] - 1)
        combined, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w, bias=bias)
        want_w = reference.dispatch(w.x, routing, per_expert, w.topk_idx, w.topk_weights, w.num_experts)
        want = reference.combine(
            ys, routing, [o["recv_topk_weights"] for o in want_w], [(xs * 2, xs - 1) for xs in w.x]
        )[rank]
        assert_bit_equal("combined_x", combined, want["combined_x"])
        assert_bit_equal("combined_topk_weights", combined_w, want["combined_topk_weights"])
        plain, _, _ = buffer.combine(y, handle)
        assert_bit_equal("combined_x without bias", plain, reference.combine(ys, routing)[rank]["combined_x"])
        kept.append((cached.clone(), cached, combined.clone(), combined))
    for round_, (cached_copy, cached, combined_copy, combined) in enumerate(kept):
        assert_bit_equal(f"round {round_} cached recv_x, later", cached, cached_copy)
        assert_bit_equal(f"round {round_} combined_x, later", combined, combined_copy)


@pytest.mark.parametrize("world", [2, 3])
def test_normal_mode_with_large_rows_reuses_buffers_safely(world: int) -> None:
    run_ranks(world, _large_rounds)


# ---- low-latency mode: the fixed-size exchange (what GPUs run) and large grids on the CPU ------------------
def _grid_round(rank: int, world: int, case: dict) -> None:
    reference_low_latency._sizes_follow_values = lambda device: False
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    x, idx = torch.zeros(2, 16, dtype=torch.bfloat16), torch.tensor([[0, -1], [-1, -1]])
    handle = buffer.low_latency_dispatch(x, idx, 4, 2 * world, use_fp8=False)[2]
    assert handle.route.token_slot is None  # the fixed-size form
    test_low_latency._round(rank, world, case)


@pytest.mark.parametrize(("world", "case"), test_low_latency.ROUND_CASES[2:14:2])
def test_fixed_size_low_latency_exchange_matches_executable_spec(world: int, case: dict) -> None:
    run_ranks(world, _grid_round, case)


def _large_grid_rounds(rank: int, world: int, fmt_name: str) -> None:
    fmt = dict(test_low_latency.FORMATS[fmt_name], hidden=1024)
    tokens_cap, experts_per_rank = 24, 4
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True, low_latency_quant=fmt["quant"])
    kept = []
    for round_ in range(3):
        case = dict(experts_per_rank=experts_per_rank, topk=3, seed=80 + round_, routing="uniform")
        case["tokens"] = [tokens_cap - s for s in range(world)]
        w = test_low_latency._workload(world, case, fmt["hidden"])
        recv_x, recv_count, handle = test_low_latency._dispatch(
            buffer, "sync", w.x[rank], w.topk_idx[rank], tokens_cap, w.num_experts, fmt
        )
        want_all = reference.low_latency_dispatch(
            w.x,
            w.topk_idx,
            tokens_cap,
            w.num_experts,
            use_fp8=fmt["use_fp8"],
            quant=fmt["quant"],
            round_scale=fmt["round_scale"],
            use_ue8m0=fmt["use_ue8m0"],
        )
        shape = (tokens_cap, fmt["hidden"], w.num_experts)
        test_low_latency._check_dispatch(recv_x, recv_count, handle, want_all[rank], world, shape)
        y = test_low_latency._expert_output(recv_x, rank)
        ys = [test_low_latency._expert_output(o["recv_x"], d) for d, o in enumerate(want_all)]
        want = reference.low_latency_combine(ys, w.topk_idx, w.topk_weights, tokens_cap)[rank]
        combined = test_low_latency._combine(buffer, "sync", y, w.topk_idx[rank], w.topk_weights[rank], handle)
        assert_bit_equal("combined_x", combined, want)
        kept.append((recv_x, recv_count, handle, want_all[rank]))
    for recv_x, recv_count, handle, want in kept:  # later rounds did not write into grids still held
        test_low_latency._check_dispatch(recv_x, recv_count, handle, want, world, shape)


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_low_latency_large_grids_are_reused_only_when_free(fmt: str) -> None:
    run_ranks(2, _large_grid_rounds, fmt)
