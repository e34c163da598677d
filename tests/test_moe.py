"""deep_ep.moe.MoELayer on gloo worlds of 1, 2 and 4 ranks against `dense_moe` in one process.

Every rank builds every rank's tokens and the whole layer's weights from one seed, runs its part of the
expert-parallel layer, and also the dense layer on all tokens, then compares. What is compared how (fp32):

- forward, 1 rank: bit for bit. Each expert multiplies the same rows in the same order in both, and the
  top-k sum runs in k order from +0.0 in both.
- forward, R > 1: the same fp32 products w[t, k] * expert(x[t]) are summed in another association (per rank
  in unpermute, then over ranks in combine), so the bound is the one for two summations of the same K terms:
  |ep - dense| <= 2 (K - 1) 2^-24 sum_k |w[t, k] expert_k(x[t])| per element (rigorous, no fitted constant).
- expert weight gradients (w1, w2): bit for bit at every group size, for the same reason as the 1-rank forward
  (identical rows, identical output gradients w * dy, identical matmul shapes).
- x and router gradients: autograd accumulates their several uses (K experts + router, and the router
  gradient over ranks) in other orders; |ep - dense| <= 2e-6 max|dense| elementwise (16 fp32 ulps of the
  largest entry; measured <= 1.2e-7 max|dense| at these sizes).
- expert_alignment > 1 pads the expert matmuls, whose shapes then differ: everything within 2e-6 max|dense|.
- bf16: one more rounding per rank (unpermute returns bf16): y within 2^-7 max|dense| (one bf16 ulp of the
  largest value), gradients within 2^-6 max|dense| (bf16 gradients pass through two roundings more).
- float64 `torch.autograd.gradcheck` of the whole layer (x, router, w1, w2) over the world: the full
  Jacobian on 1 rank, torch's fast mode (random projections u^T J v) on 2 and 4, where every Jacobian entry
  costs a round of collectives (test_autograd checks dispatch/combine's full Jacobian on 2 ranks).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_autograd import distributed_gradcheck

from deep_ep import Buffer, CollectiveMismatchError
from deep_ep.moe import MoELayer, MoEWeights, dense_moe, expert_mlp, init_moe_weights, moe_forward, route
from deep_ep.testing import run_ranks
from deep_ep.testing.compare import assert_bit_equal


def _inputs(world: int, tokens: int, hidden: int, seed: int, dtype: torch.dtype) -> tuple[list, list]:
    """Every rank's tokens x[s] [N, H] and output gradients g[s] [N, H]."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, hidden, generator=gen).to(dtype) for _ in range(world)]
    gs = [torch.randn(tokens, hidden, generator=gen).to(dtype) for _ in range(world)]
    return xs, gs


def _abs_terms(xs: list[torch.Tensor], weights: MoEWeights, top_k: int) -> torch.Tensor:
    """sum_k |w[t, k] * expert_k(x[t])| in float64, all ranks' tokens: the scale of the summation error."""
    out = []
    for x in xs:
        idx, w = route(x, weights.router, top_k)
        total = torch.zeros(x.shape, dtype=torch.float64)
        for k in range(top_k):
            for t in range(x.shape[0]):
                e = int(idx[t, k])
                term = w[t, k] * expert_mlp(x[t : t + 1], weights.w1[e], weights.w2[e])[0]
                total += term.double().abs()
        out.append(total)
    return torch.cat(out)


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, relative_to_max: float) -> None:
    """|actual - expected| <= relative_to_max * max|expected|, elementwise."""
    bound = relative_to_max * float(expected.detach().abs().max())
    err = float((actual.detach() - expected.detach()).abs().max()) if expected.numel() else 0.0
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} ({relative_to_max:g} x max|expected|)"


def _run_both(rank: int, world: int, case: dict) -> dict:
    """The expert-parallel layer on this rank and the dense layer on all ranks' tokens, with gradients."""
    dtype = case.get("dtype", torch.float32)
    hidden, ffn, experts, top_k, tokens = case["hidden"], case["ffn"], case["experts"], case["top_k"], case["tokens"]
    xs, gs = _inputs(world, tokens, hidden, case["seed"], dtype)
    options = dict(expert_alignment=case.get("align", 1), normalize_topk=case.get("normalize", False))
    layer = MoELayer(hidden, ffn, experts, top_k, dist.group.WORLD, dtype=dtype, seed=case["seed"], **options)
    x = xs[rank].clone().requires_grad_()
    y = layer(x)
    (y * gs[rank]).sum().backward()
    router_grad = layer.router.grad.clone()
    dist.all_reduce(router_grad)  # the data-parallel reduction: each rank's router saw its own tokens

    full = layer.full_weights()
    dense = MoEWeights(*(t.clone().requires_grad_() for t in (full.router, full.w1, full.w2)))
    dense_xs = [t.clone().requires_grad_() for t in xs]
    ys = dense_moe(dense_xs, dense, top_k, normalize_topk=options["normalize_topk"])
    sum((a * b).sum() for a, b in zip(ys, gs)).backward()
    mine = slice(layer.local_experts.start, layer.local_experts.stop)
    assert layer.local_experts == range(rank * (experts // world), (rank + 1) * (experts // world))
    return dict(
        y=(y, ys[rank]),
        grad_x=(x.grad, dense_xs[rank].grad),
        grad_router=(router_grad, dense.router.grad),
        grad_w1=(layer.w1.grad, dense.w1.grad[mine]),
        grad_w2=(layer.w2.grad, dense.w2.grad[mine]),
        abs_terms=_abs_terms(xs, full, top_k).split(tokens)[rank] if dtype == torch.float32 else None,
    )


BASE = dict(hidden=8, ffn=6, experts=8, top_k=3, tokens=5, seed=3)


def _check_fp32(rank: int, world: int) -> None:
    got = _run_both(rank, world, BASE)
    y, want = got["y"]
    if world == 1:
        assert_bit_equal("y", y, want)
    else:
        bound = 2 * (BASE["top_k"] - 1) * 2.0**-24 * got["abs_terms"]
        excess = (y.detach().double() - want.detach().double()).abs() - bound
        assert float(excess.max()) <= 0, f"y exceeds the reassociation bound by {float(excess.max()):.3g}"
    assert_bit_equal("grad w1", *got["grad_w1"])
    assert_bit_equal("grad w2", *got["grad_w2"])
    _close("grad x", *got["grad_x"], 2e-6)
    _close("grad router", *got["grad_router"], 2e-6)


def _check_variants(rank: int, world: int) -> None:
    # expert_alignment pads every expert's rows; normalize_topk renormalises the top-k weights.
    got = _run_both(rank, world, dict(BASE, align=4, normalize=True, seed=5))
    for name in ("y", "grad_x", "grad_router", "grad_w1", "grad_w2"):
        _close(name, *got[name], 2e-6)
    # bf16 activations and weights (router softmax and top-k weights in fp32).
    got = _run_both(rank, world, dict(BASE, dtype=torch.bfloat16, seed=6))
    _close("bf16 y", *got["y"], 2.0**-7)
    for name in ("grad_x", "grad_router", "grad_w1", "grad_w2"):
        _close(f"bf16 {name}", *got[name], 2.0**-6)
    _check_layer_arguments(rank, world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_matches_dense_fp32(world: int) -> None:
    run_ranks(world, _check_fp32)


def test_alignment_normalize_bf16_and_layer_arguments() -> None:
    run_ranks(2, _check_variants)


def _check_gradcheck(rank: int, world: int) -> None:
    hidden, ffn, top_k, tokens = 2, 2, 2, 2
    experts = 2 * world
    local = slice(rank * 2, rank * 2 + 2)
    weights = init_moe_weights(hidden, ffn, experts, seed=7, dtype=torch.float64)
    xs = torch.randn(world, tokens, hidden, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    buffer = Buffer(dist.group.WORLD)
    inputs = tuple(t.clone().requires_grad_() for t in (xs, weights.router, weights.w1, weights.w2))

    def fn(xs: torch.Tensor, router: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor]:
        return (moe_forward(xs[rank], router, w1[local], w2[local], buffer, top_k, expert_alignment=2),)

    distributed_gradcheck(fn, inputs, fast_mode=world > 1)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_gradcheck_float64(world: int) -> None:
    run_ranks(world, _check_gradcheck)


def _check_layer_arguments(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="num_experts=3 is not divisible by num_ranks=2"):
        MoELayer(4, 4, 3, 1, dist.group.WORLD)
    with pytest.raises(ValueError, match="top_k=5"):
        MoELayer(4, 4, 4, 5, dist.group.WORLD)
    with pytest.raises(TypeError, match="top_k must be an int, got float 2.0"):
        MoELayer(4, 4, 4, 2.0, buffer=Buffer(dist.group.WORLD))
    with pytest.raises(TypeError, match="ffn_hidden must be an int"):
        MoELayer(4, 4.0, 4, 2, buffer=Buffer(dist.group.WORLD))
    layer = MoELayer(4, 4, 4, 2, buffer=Buffer(dist.group.WORLD))
    assert "local_experts=" in repr(layer)
    assert layer.w1.shape == (2, 4, 4) and layer.w2.shape == (2, 4, 4) and layer.router.shape == (4, 4)
    full = layer.full_weights()
    assert_bit_equal("this rank's w1 slice", layer.w1.detach(), full.w1[rank * 2 : rank * 2 + 2])
    # Tokens of different counts per rank, including none at all.
    x = torch.randn(3 * rank, 4, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    y = layer(x)
    assert y.shape == (3 * rank, 4)
    y.sum().backward()  # an expanded gradient, also with no rows at all on rank 0
    assert x.grad.shape == x.shape and layer.router.grad is not None
    assert layer.w1.grad is not None and layer.w2.grad is not None


def test_route_refuses_top_k_outside_one_to_num_experts() -> None:
    x, router = torch.randn(3, 4), torch.randn(4, 4)
    for top_k, error, message in (
        (0, ValueError, "top_k=0 must be >= 1"),  # was: no expert at all, and a zero output
        (-1, ValueError, "top_k=-1 must be >= 1"),
        (5, ValueError, r"top_k=5 must be in \[1, num_experts=4\]"),
        (2.0, TypeError, "top_k must be an int, got float 2.0"),
    ):
        with pytest.raises(error, match=message):
            route(x, router, top_k)


# ---- an error on one rank fails the call on every rank, and the next call pairs up ---------------------------
def _step(buffer: Buffer, rank: int, world: int, seed: int) -> tuple[torch.Tensor, ...]:
    """moe_forward and backward on data unique to `seed`: y and the gradients of x, router, w1 and w2."""
    weights = init_moe_weights(8, 6, 2 * world, seed=seed)
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(5, 8, generator=gen).requires_grad_()
    params = [t.clone().requires_grad_() for t in (weights.router, weights.w1[2 * rank : 2 * rank + 2])]
    params.append(weights.w2[2 * rank : 2 * rank + 2].clone().requires_grad_())
    y = moe_forward(x, *params, buffer, 2)
    y.backward(torch.randn(5, 8, generator=gen))
    return (y, x.grad, *(t.grad for t in params))


ONE_RANK_ERRORS = {
    # case: (how the last rank's arguments differ, its exception and message, the call its peers fail in)
    "router_weight of another expert count": (
        lambda a: dict(a, router_weight=a["router_weight"][:3]),
        (ValueError, "router_weight has 3 experts"),
        "dispatch",
    ),
    "x of another hidden size": (
        lambda a: dict(a, x=torch.randn(5, 9)),
        (ValueError, r"w1 \[2, 8, 6\] must be \[L, H, F\] with H = 9"),
        "dispatch",
    ),
    "x 3-D": (lambda a: dict(a, x=a["x"][None]), (ValueError, r"^x must be 2-D, got shape \[1, 5, 8\]"), "dispatch"),
    "w1 of another ffn size": (
        lambda a: dict(a, w1=a["w1"][:, :, :5]),
        (ValueError, r"w2 \[2, 6, 8\] must be \[L, F, H\]"),
        "dispatch",
    ),
    "top_k 0": (lambda a: dict(a, top_k=0), (ValueError, "top_k=0 must be >= 1"), "dispatch"),
    "top_k a float": (lambda a: dict(a, top_k=2.0), (TypeError, "top_k must be an int"), "dispatch"),
    "top_k above num_experts": (
        lambda a: dict(a, top_k=5),
        (ValueError, r"top_k=5 must be in \[1, num_experts=4\]"),
        "dispatch",
    ),
    "experts in bf16 (they fail after dispatch)": (
        lambda a: dict(a, w1=a["w1"].bfloat16(), w2=a["w2"].bfloat16()),
        (RuntimeError, "dtype"),
        "combine",
    ),
}


def _one_rank_fails(rank: int, world: int, case: str) -> str:
    buffer = Buffer(dist.group.WORLD)
    buffer.comm_timeout = 20.0  # a peer left waiting fails the test in seconds
    weights = init_moe_weights(8, 6, 2 * world, seed=30)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(rank))
    args = dict(x=x, router_weight=weights.router, w1=weights.w1[2 * rank : 2 * rank + 2], top_k=2)
    args.update(w2=weights.w2[2 * rank : 2 * rank + 2], buffer=buffer)
    differ, (error, message), _ = ONE_RANK_ERRORS[case]
    last = rank == world - 1
    with pytest.raises(error if last else CollectiveMismatchError, match=message if last else None) as info:
        moe_forward(**(differ(args) if last else args))
    # The next call (forward and backward) pairs up: it equals the same call on a Buffer that saw no error.
    after = _step(buffer, rank, world, seed=31)
    clean = _step(Buffer(dist.group.WORLD), rank, world, seed=31)
    for name, a, b in zip(("y", "grad x", "grad router", "grad w1", "grad w2"), after, clean):
        assert_bit_equal(f"{name} after the error", a, b)
    return str(info.value)


@pytest.mark.parametrize("case", sorted(ONE_RANK_ERRORS))
def test_an_error_on_one_rank_fails_the_call_on_every_rank(case: str) -> None:
    messages = run_ranks(2, _one_rank_fails, case, timeout=120)
    assert f"{ONE_RANK_ERRORS[case][2]}: rank(s) [1] rejected their arguments" in messages[0], messages
