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

`dense_moe` shares `route`, `expert_mlp` and `init_moe_weights` with the layer, so it cannot catch their
mistakes: those are checked against definitions written out by hand (explicit sums in float64): route's
softmax top-k (on logits exact in bf16, so its fp32 softmax is checked in bf16 too), expert_mlp with two
activations, the init scales (statistically), and the whole layer on 2 ranks with a non-default activation,
forward and gradients within 1e-5 of the largest value. Then a rank that fails alone: every rank raises.
"""

from __future__ import annotations

import math

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


# ---- the pieces against definitions written out by hand (dense_moe reuses them, so it cannot check them) ----
def _naive_route(x: torch.Tensor, router: torch.Tensor, top_k: int, normalize: bool) -> tuple[list, list]:
    """Per token, in float64: logits by explicit sums, softmax, the top_k largest (ties must not occur)."""
    ids, weights = [], []
    for t in range(x.shape[0]):
        logits = [sum(float(x[t, h]) * float(router[e, h]) for h in range(x.shape[1])) for e in range(router.shape[0])]
        assert len(set(logits)) == len(logits), "ties make the top-k order ambiguous"
        exps = [math.exp(v - max(logits)) for v in logits]
        probs = [v / sum(exps) for v in exps]
        top = sorted(range(len(probs)), key=lambda e: -probs[e])[:top_k]
        chosen = [probs[e] for e in top]
        ids.append(top)
        weights.append([w / sum(chosen) for w in chosen] if normalize else chosen)
    return ids, weights


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_is_a_softmax_top_k_in_fp32(dtype: torch.dtype, normalize: bool) -> None:
    # Logits (e + 8 a) / 64 with |e + 8 a| < 256, a small integer: exact in bf16 and distinct, so the top-k
    # order is defined and only the softmax's precision remains (fp32: ~1e-7; computed in bf16: ~4e-3).
    gen = torch.Generator().manual_seed(40)
    experts, hidden = 8, 6
    x = torch.randint(-1, 2, (12, hidden), generator=gen).float()
    x[:, 0] = 1
    router = torch.randint(-2, 3, (experts, hidden), generator=gen) / 8
    router[:, 0] = torch.arange(experts) / 64
    idx, weights = route(x.to(dtype), router.to(dtype), 3, normalize_topk=normalize)
    want_idx, want_weights = _naive_route(x, router, 3, normalize)
    assert idx.tolist() == want_idx
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.tensor(want_weights, dtype=torch.float32), rtol=1e-5, atol=0)


def _naive_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, act) -> torch.Tensor:
    """activation(x @ w1) @ w2 by explicit sums in float64."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for m in range(x.shape[0]):
        inner = [act(sum(float(x[m, h]) * float(w1[h, f]) for h in range(x.shape[1]))) for f in range(w1.shape[1])]
        for h in range(w2.shape[1]):
            out[m, h] = sum(inner[f] * float(w2[f, h]) for f in range(w1.shape[1]))
    return out


def _silu(v: float) -> float:
    return v / (1 + math.exp(-v))


def test_expert_mlp_applies_the_activation_between_the_matmuls() -> None:
    gen = torch.Generator().manual_seed(41)
    x, w1, w2 = torch.randn(3, 4, generator=gen), torch.randn(4, 5, generator=gen), torch.randn(5, 4, generator=gen)
    torch.testing.assert_close(expert_mlp(x, w1, w2).double(), _naive_mlp(x, w1, w2, _silu), rtol=1e-5, atol=1e-6)
    got = expert_mlp(x, w1, w2, activation=torch.tanh).double()
    torch.testing.assert_close(got, _naive_mlp(x, w1, w2, math.tanh), rtol=1e-5, atol=1e-6)


def test_init_moe_weights_scales_by_fan_in() -> None:
    # Standard normal entries divided by sqrt(fan in): router and w1 by sqrt(H), w2 by sqrt(F). H != F, so a
    # swapped scale shows; 8192 entries in w1 and w2, 512 in the router (its std varies by ~3%).
    hidden, ffn, experts = 64, 16, 8
    weights = init_moe_weights(hidden, ffn, experts, seed=42)
    assert (weights.router.shape, weights.w1.shape, weights.w2.shape) == ((8, 64), (8, 64, 16), (8, 16, 64))
    for name, tensor, fan_in in (
        ("router", weights.router, hidden),
        ("w1", weights.w1, hidden),
        ("w2", weights.w2, ffn),
    ):
        std = float(tensor.std()) * math.sqrt(fan_in)
        assert 0.88 < std < 1.12, f"{name}: std * sqrt(fan in) = {std:.3f}, not about 1"
    again = init_moe_weights(hidden, ffn, experts, seed=42, dtype=torch.bfloat16)  # the same draw, then cast
    for a, b in zip((again.router, again.w1, again.w2), (weights.router, weights.w1, weights.w2)):
        assert_bit_equal("bf16 weights", a, b.bfloat16())


def _naive_layer(xs: list, router: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, top_k: int, act) -> list:
    """Every rank's y, from the definitions, differentiable: per token a softmax over explicit logits, the
    top_k largest renormalised, and each chosen expert's activation(x @ w1[e]) @ w2[e] weighted."""
    ys = []
    for x in xs:
        rows = []
        for t in range(x.shape[0]):
            logits = torch.stack([(router[e] * x[t]).sum() for e in range(router.shape[0])])
            exps = torch.exp(logits - logits.max())
            probs = exps / exps.sum()
            top = sorted(range(len(probs)), key=lambda e: -float(probs[e]))[:top_k]
            chosen = probs[top] / probs[top].sum()
            rows.append(sum(chosen[k] * (act(x[t] @ w1[e]) @ w2[e]) for k, e in enumerate(top)))
        ys.append(torch.stack(rows))
    return ys


def _check_against_naive_layer(rank: int, world: int) -> None:
    hidden, ffn, experts, top_k, tokens = 8, 6, 8, 3, 5
    xs, gs = _inputs(world, tokens, hidden, 43, torch.float32)
    layer = MoELayer(hidden, ffn, experts, top_k, dist.group.WORLD, seed=43, activation=torch.tanh, normalize_topk=True)
    x = xs[rank].clone().requires_grad_()
    y = layer(x)
    (y * gs[rank]).sum().backward()
    router_grad = layer.router.grad.clone()
    dist.all_reduce(router_grad)

    full = layer.full_weights()
    params = [t.double().requires_grad_() for t in (full.router, full.w1, full.w2)]
    naive_xs = [t.double().requires_grad_() for t in xs]
    ys = _naive_layer(naive_xs, *params, top_k, torch.tanh)
    sum((a * b.double()).sum() for a, b in zip(ys, gs)).backward()
    mine = slice(layer.local_experts.start, layer.local_experts.stop)
    _close("y", y, ys[rank].float(), 1e-5)
    _close("grad x", x.grad, naive_xs[rank].grad.float(), 1e-5)
    _close("grad router", router_grad, params[0].grad.float(), 1e-5)
    _close("grad w1", layer.w1.grad, params[1].grad[mine].float(), 1e-5)
    _close("grad w2", layer.w2.grad, params[2].grad[mine].float(), 1e-5)


def test_layer_matches_a_naive_layer_with_another_activation() -> None:
    run_ranks(2, _check_against_naive_layer)


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


def _layer_built_apart(rank: int, world: int, case: str) -> str:
    """MoELayer(...) where the last rank differs: every rank raises at once, and a layer built afterwards on the
    same Buffer works."""
    buffer = Buffer(dist.group.WORLD)
    buffer.comm_timeout = 20.0  # a peer left waiting fails the test in seconds
    last = rank == world - 1
    sizes = dict(hidden=4, ffn_hidden=4, num_experts=2 * world, top_k=2)
    if last:
        sizes.update({"top_k": dict(top_k=0), "hidden": dict(hidden=8)}.get(case, {}))
    seed = {"seed": 1, "seed_text": "x", "seed_half": 0.5}.get(case, 0) if last else 0
    with pytest.raises((ValueError, TypeError, CollectiveMismatchError)) as info:
        MoELayer(**sizes, buffer=buffer, seed=seed)
    layer = MoELayer(4, 4, 2 * world, 2, buffer=buffer)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    layer(x).sum().backward()
    return str(info.value)


@pytest.mark.parametrize(
    "case,last_says,others_say",
    [
        ("top_k", "top_k=0 must be >= 1", "moe_layer: rank(s) [1] rejected their arguments"),
        ("hidden", "hidden: rank 0=4, rank 1=8", None),
        ("seed", "seed: rank 0=0, rank 1=1", None),
        ("seed_text", "seed must be an int, got str 'x'", "moe_layer: rank(s) [1] rejected their arguments"),
        ("seed_half", "seed must be an int, got float 0.5", "moe_layer: rank(s) [1] rejected their arguments"),
    ],
)
def test_layers_built_apart_fail_on_every_rank(case: str, last_says: str, others_say: str | None) -> None:
    messages = run_ranks(2, _layer_built_apart, case, timeout=120)
    assert last_says in messages[1] and (others_say or last_says) in messages[0], messages
