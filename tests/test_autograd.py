"""deep_ep.autograd on real gloo worlds: gradients of dispatch and combine, bit for bit, and float64 gradcheck.

Gradients fed to the outputs are self-describing: the gradient of a received row depends only on (receiving
rank, source rank, source token), so every rank can predict every other rank's contribution. The expected
input gradients then follow SPEC 5 exactly (fp32 sum over destination ranks ascending, one rounding), which
makes the comparisons bit for bit.

`distributed_gradcheck` runs `torch.autograd.gradcheck` on a whole world at once: every rank holds every
rank's inputs (replicated; backward sums their gradients over ranks) and every rank's outputs (all-gathered),
so all ranks perturb the same element and seed the same output gradient at every step. test_moe uses it too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from deep_ep import Buffer
from deep_ep import autograd as ep
from deep_ep.testing import run_ranks
from deep_ep.testing.compare import assert_bit_equal
from deep_ep.testing.workloads import make_workload

# ---- a world-wide gradcheck ---------------------------------------------------------------------------------


class _Replicated(torch.autograd.Function):
    """Identity; backward sums the gradient over ranks (each rank uses its own part of a replicated input)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _Gathered(torch.autograd.Function):
    """[R, *t.shape] from every rank; backward keeps this rank's slice (all ranks seed the same gradient)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[dist.get_rank()].clone()


def distributed_gradcheck(
    fn: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...], fast_mode: bool = False
) -> None:
    """gradcheck of `fn(*replicated_inputs) -> this rank's outputs` as one function of the whole world.

    `inputs` must be identical on every rank (float64, requires_grad) and every rank's outputs must have the
    same shapes. Tolerances: float64 central differences with eps=1e-6 are accurate to about 1e-10 here.
    `fast_mode` (torch's: compares u^T J v for random u, v instead of every entry of J) is for larger worlds,
    where the full Jacobian's hundreds of collective rounds cost seconds on two cores.
    """

    def world(*replicated: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = fn(*(_Replicated.apply(t) for t in replicated))
        return tuple(_Gathered.apply(o) for o in outs)

    assert torch.autograd.gradcheck(world, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=fast_mode)


# ---- helpers ------------------------------------------------------------------------------------------------


def _sources(handle: tuple, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source rank, source token) of each received row, from handle[0] and handle[3] (SPEC 4)."""
    src_token = handle[3].long()
    ends = handle[0][:, rank].long()
    src_rank = torch.searchsorted(ends, torch.arange(src_token.numel()), right=True)
    return src_rank.clamp(max=len(ends) - 1), src_token.clamp(min=0)


def _table(seed: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- dispatch / combine gradients, bit for bit ----------------------------------------------------------------


def _check_gradients(rank: int, world: int, routing: str, dtype: torch.dtype, async_finish: bool) -> None:
    tokens, hidden, topk = 6, 8, 3
    experts = 2 * world if world > 1 else 4
    w = make_workload(world, tokens, hidden, topk, experts, seed=21, routing=routing, dtype=dtype)
    local = experts // world
    buffer = Buffer(dist.group.WORLD)
    x = w.x[rank].clone().requires_grad_()
    weights = w.topk_weights[rank].clone().requires_grad_()

    # dispatch: forward equals Buffer.dispatch; backward is combine with the local pairs' weight gradients.
    result = ep.dispatch(buffer, x, w.topk_idx[rank], weights, experts, async_finish=async_finish)
    if async_finish:
        with result.event:
            pass
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(w.topk_idx[rank], experts)
    plain = buffer.dispatch(
        w.x[rank],
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=w.topk_idx[rank],
        topk_weights=w.topk_weights[rank],
    )
    for i, name in enumerate(["recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert_list"]):
        assert_bit_equal(name, result[i], plain[i])
    assert result.recv_x.requires_grad and result.recv_topk_weights.requires_grad
    assert not result.recv_topk_idx.requires_grad

    grad_x_table = _table(1, world, world, tokens, hidden, dtype=dtype)  # [destination, source, token]
    grad_w_table = _table(2, world, world, tokens, topk)
    src_rank, src_token = _sources(result.handle, rank)
    # Every slot of recv_topk_weights gets a gradient, also the zeroed non-local ones: those must not leak.
    loss = (result.recv_x * grad_x_table[rank, src_rank, src_token]).sum()
    loss = loss + (result.recv_topk_weights * grad_w_table[rank, src_rank, src_token]).sum()
    loss.backward()

    valid = w.topk_idx[rank] >= 0
    want_x = torch.zeros(tokens, hidden)
    for d in range(world):  # SPEC 5: fp32 sum over destination ranks ascending from +0.0, one rounding
        want_x = want_x + torch.where(in_rank[:, d : d + 1], grad_x_table[d, rank].float(), 0.0)
    assert_bit_equal("grad x", x.grad, want_x.to(dtype))
    owner = torch.where(valid, w.topk_idx[rank] // local, 0)
    want_w = grad_w_table[owner, rank, torch.arange(tokens).unsqueeze(1), torch.arange(topk)]
    assert_bit_equal("grad topk_weights", weights.grad, torch.where(valid, want_w, 0.0))

    # combine: forward equals Buffer.combine; backward is cached dispatch (+ the gradient itself for bias).
    recv = result.recv_x.detach().clone().requires_grad_()
    recv_w = result.recv_topk_weights.detach().clone().requires_grad_()
    bias = (
        _table(3 + rank, tokens, hidden, dtype=dtype).requires_grad_(),
        _table(9 + rank, tokens, hidden, dtype=dtype),
    )
    combined = ep.combine(buffer, recv, result.handle, topk_weights=recv_w, bias=bias, async_finish=async_finish)
    combined.event.current_stream_wait()
    want = buffer.combine(
        recv.detach(), result.handle, topk_weights=recv_w.detach(), bias=tuple(b.detach() for b in bias)
    )
    assert_bit_equal("combined_x", combined.combined_x, want[0])
    assert_bit_equal("combined_topk_weights", combined.combined_topk_weights, want[1])
    grad_c = _table(4, world, tokens, hidden, dtype=dtype)
    grad_cw = _table(5, world, tokens, topk)
    ((combined.combined_x * grad_c[rank]).sum() + (combined.combined_topk_weights * grad_cw[rank]).sum()).backward()
    assert_bit_equal("grad recv_x", recv.grad, grad_c[src_rank, src_token])
    assert_bit_equal("grad recv_topk_weights", recv_w.grad, grad_cw[src_rank, src_token])
    assert_bit_equal("grad bias", bias[0].grad, grad_c[rank])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_dispatch_combine_gradients_bit_exact(world: int) -> None:
    run_ranks(world, _check_all_gradients)


def _check_all_gradients(rank: int, world: int) -> None:
    for routing, dtype, async_finish in [
        ("uniform", torch.float32, False),
        ("sparse", torch.bfloat16, False),
        ("idle_rank", torch.float32, True),
    ]:
        _check_gradients(rank, world, routing, dtype, async_finish)


# ---- num_worst_tokens, async, errors --------------------------------------------------------------------------


def _pipeline(buffer: Buffer, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: int, worst: int):
    """dispatch -> permute -> a per-row nonlinearity -> unpermute -> combine (static sizes with `worst`)."""
    from deep_ep.permute import permute, unpermute

    local = experts // buffer.group_size
    sent = ep.dispatch(buffer, x, idx, weights, experts, num_worst_tokens=worst)
    if worst:
        assert sent.recv_x.shape[0] == worst and sent.num_recv_tokens_per_expert_list == []
        grouped = permute(sent.recv_x, sent.recv_topk_idx, local, num_out_tokens=worst * idx.shape[1])
    else:
        grouped = permute(
            sent.recv_x, sent.recv_topk_idx, local, num_tokens_per_expert=sent.num_recv_tokens_per_expert_list
        )
    per_row = unpermute(torch.tanh(grouped.permuted_x) * 2, grouped.handle, sent.recv_topk_weights)
    return ep.combine(buffer, per_row, sent.handle).combined_x, sent


def _check_worst_and_errors(rank: int, world: int) -> None:
    tokens, hidden, topk, experts = 5, 4, 2, 2 * world
    w = make_workload(world, tokens, hidden, topk, experts, seed=31, routing="sparse")
    buffer = Buffer(dist.group.WORLD)
    grads = {}
    for worst in (0, tokens * world):
        x = w.x[rank].float().clone().requires_grad_()
        weights = w.topk_weights[rank].clone().requires_grad_()
        y, sent = _pipeline(buffer, x, w.topk_idx[rank], weights, experts, worst)
        (y * _table(7 + rank, tokens, hidden)).sum().backward()
        grads[worst] = (y.detach(), x.grad, weights.grad)
    for name, a, b in zip(["y", "grad x", "grad topk_weights"], grads[0], grads[tokens * world]):
        assert_bit_equal(f"num_worst_tokens vs exact: {name}", b, a)

    # combine backward gives padding rows (never read by combine) a zero gradient.
    recv = sent.recv_x.detach().clone().requires_grad_()
    ep.combine(buffer, recv, sent.handle).combined_x.sum().backward()
    padding = sent.handle[3] < 0
    assert int(padding.sum()) > 0
    assert_bit_equal("padding rows' gradient", recv.grad[padding], torch.zeros(int(padding.sum()), hidden))
    assert_bit_equal("real rows' gradient", recv.grad[~padding], torch.ones(int((~padding).sum()), hidden))

    # float64 weights (their own path) asynchronously: the event's wait fills and masks them.
    x64 = w.x[rank].double().requires_grad_()
    w64 = w.topk_weights[rank].double().requires_grad_()
    late = ep.dispatch(buffer, x64, w.topk_idx[rank], w64, experts, async_finish=True)
    late.event.current_stream_wait()
    now = ep.dispatch(buffer, x64.detach(), w.topk_idx[rank], w64.detach(), experts)
    assert_bit_equal("async float64 recv_topk_weights", late.recv_topk_weights, now.recv_topk_weights)
    assert_bit_equal("async float64 recv_x", late.recv_x, now.recv_x)
    assert bool((late.recv_topk_weights[late.recv_topk_idx < 0] == 0).all())
    (late.recv_x.sum() + late.recv_topk_weights.sum()).backward()
    assert_bit_equal("grad float64 weights", w64.grad, (w.topk_idx[rank] >= 0).double())

    # Arguments are checked before any communication (same on every rank, so nobody hangs).
    x, idx, weights = w.x[rank].float(), w.topk_idx[rank], w.topk_weights[rank]
    with pytest.raises(TypeError, match="buffer must be a deep_ep.Buffer"):
        ep.dispatch(dist.group.WORLD, x, idx, weights, experts)
    with pytest.raises(TypeError, match="fp8 tuples are not differentiable"):
        ep.dispatch(buffer, (x, x[:, :1]), idx, weights, experts)
    with pytest.raises(ValueError, match="topk_weights has shape"):
        ep.dispatch(buffer, x, idx, weights[:, :1], experts)
    with pytest.raises(TypeError, match="bias must be None"):
        ep.combine(buffer, recv, sent.handle, bias=[recv])
    # The Buffer's own checks still apply (and leave it usable).
    with pytest.raises(ValueError, match="rows but the handle"):
        ep.combine(buffer, recv[1:], sent.handle)
    ep.combine(buffer, recv.detach(), sent.handle)


def test_num_worst_tokens_and_errors() -> None:
    run_ranks(2, _check_worst_and_errors)


def _check_recv_topk_idx_reused(rank: int, world: int) -> None:
    """The caller owns recv_topk_idx: rewriting it in place (-1 -> an overflow bucket, as scatter code does) must
    not change the weight gradients, which follow the routing (the pair's owner rank) alone."""
    tokens, topk, experts = 6, 3, 2 * world
    w = make_workload(world, tokens, 4, topk, experts, seed=51, routing="sparse", dtype=torch.float32)
    buffer = Buffer(dist.group.WORLD)
    table = _table(6, world, world, tokens, topk, dtype=torch.float64)  # [destination, source, token, k]
    valid = w.topk_idx[rank] >= 0
    owner = torch.where(valid, w.topk_idx[rank] // (experts // world), 0)
    want = torch.where(valid, table[owner, rank, torch.arange(tokens).unsqueeze(1), torch.arange(topk)], 0.0)
    for dtype, async_finish in [(torch.float32, False), (torch.float64, True)]:
        weights = w.topk_weights[rank].to(dtype, copy=True).requires_grad_()
        sent = ep.dispatch(buffer, w.x[rank], w.topk_idx[rank], weights, experts, async_finish=async_finish)
        sent.event.current_stream_wait()
        sent.recv_topk_idx.masked_fill_(sent.recv_topk_idx < 0, experts // world)
        src_rank, src_token = _sources(sent.handle, rank)
        (sent.recv_topk_weights * table[rank, src_rank, src_token].to(dtype)).sum().backward()
        assert_bit_equal(f"grad topk_weights ({dtype})", weights.grad, want.to(dtype))

    # Nor does backward depend on the event's wait: here a combine with the handle completes the async dispatch.
    weights = w.topk_weights[rank].clone().requires_grad_()
    sent = ep.dispatch(buffer, w.x[rank], w.topk_idx[rank], weights, experts, async_finish=True)
    ep.combine(buffer, sent.recv_x, sent.handle)
    src_rank, src_token = _sources(sent.handle, rank)
    (sent.recv_topk_weights * table[rank, src_rank, src_token].float()).sum().backward()
    assert_bit_equal("grad topk_weights (event never waited on)", weights.grad, want.float())


def test_rewriting_recv_topk_idx_in_place_keeps_the_weight_gradients() -> None:
    run_ranks(2, _check_recv_topk_idx_reused)


def _check_dtypes_combine_refuses(rank: int, world: int) -> None:
    """Tensors whose dtype the Buffer's combine refuses are refused where they are passed: dispatch's x and non-float32
    weights (backward combines their gradients), combine's non-float32 weights (summed by a combine of their own).
    One rank alone passing one fails the call on every rank, and the Buffer stays usable."""
    from deep_ep import CollectiveMismatchError

    tokens, hidden, topk, experts = 4, 3, 2, 2 * world
    w = make_workload(world, tokens, hidden, topk, experts, seed=61, dtype=torch.float32)
    buffer = Buffer(dist.group.WORLD)
    x, idx, weights = w.x[rank], w.topk_idx[rank], w.topk_weights[rank].clone().requires_grad_()
    for bad_x in (x.to(torch.int8), x.to(torch.float8_e4m3fn)):
        with pytest.raises(TypeError, match=f"x has dtype {bad_x.dtype}, but combine carries its gradient"):
            ep.dispatch(buffer, bad_x, idx, weights, experts)
    with pytest.raises(TypeError, match="topk_weights has dtype torch.float8_e4m3fn"):
        ep.dispatch(buffer, x, idx, weights.detach().to(torch.float8_e4m3fn), experts)
    last = rank == world - 1
    with pytest.raises(TypeError if last else CollectiveMismatchError, match="x has dtype" if last else "rejected"):
        ep.dispatch(buffer, x.to(torch.int8) if last else x, idx, weights, experts)

    x64 = x.double().requires_grad_()
    sent = ep.dispatch(buffer, x64, idx, weights.double(), experts)
    recv_w = sent.recv_topk_weights
    with pytest.raises(ValueError if last else CollectiveMismatchError, match="topk_weights must be" if last else None):
        ep.combine(buffer, sent.recv_x, sent.handle, topk_weights=recv_w[:1] if last else recv_w)
    out = ep.combine(buffer, sent.recv_x, sent.handle, topk_weights=recv_w)
    (out.combined_x.sum() + out.combined_topk_weights.sum()).backward()
    in_rank = buffer.get_dispatch_layout(idx, experts)[3]
    assert_bit_equal("grad x after the errors", x64.grad, in_rank.sum(1, keepdim=True).double().expand(-1, hidden))
    assert_bit_equal("grad topk_weights after the errors", weights.grad, (idx >= 0).float())


def test_dtypes_combine_refuses_fail_in_forward_on_every_rank() -> None:
    run_ranks(2, _check_dtypes_combine_refuses)


# ---- float64 gradcheck over the whole world -------------------------------------------------------------------


def _check_gradcheck(rank: int, world: int) -> None:
    tokens, hidden, topk, experts = 2, 2, 2, 2 * world
    w = make_workload(world, tokens, hidden, topk, experts, seed=41, routing="uniform", dtype=torch.float32)
    buffer = Buffer(dist.group.WORLD)
    xs = torch.stack(w.x).double().requires_grad_()  # [R, N, H]: every rank's tokens, on every rank
    ws = torch.stack(w.topk_weights).double().requires_grad_()  # [R, N, K]; float64 weights travel exactly
    idx = w.topk_idx[rank]

    def fn(xs: torch.Tensor, ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sent = ep.dispatch(buffer, xs[rank], idx, ws[rank], experts)
        assert sent.recv_topk_weights.dtype == torch.float64
        y = torch.tanh(sent.recv_x) * (1 + sent.recv_topk_weights.sum(-1, keepdim=True))
        out = ep.combine(buffer, y, sent.handle, topk_weights=sent.recv_topk_weights**2)
        return out.combined_x, out.combined_topk_weights

    distributed_gradcheck(fn, (xs, ws))


@pytest.mark.parametrize("world", [1, 2])
def test_gradcheck_float64(world: int) -> None:
    """Full Jacobians; 4 ranks are gradchecked through the MoE layer (test_moe), which uses both functions."""
    run_ranks(world, _check_gradcheck)
