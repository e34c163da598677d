"""Reference backend == executable spec, bit for bit, on real gloo worlds (SPEC sections 3-5)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import reference
from deep_ep import Buffer, Config
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
    combined, combined_w, _ = buffer.combine(expert_out[rank], handle, topk_weights=returned_w[rank], bias=my_bias)
    want = reference.combine(expert_out, routing, returned_w, ref_bias)[rank]
    assert_bit_equal("combined_x", combined, want["combined_x"])
    assert_bit_equal("combined_topk_weights", combined_w, want["combined_topk_weights"])
    return {"recv": int(recv_x.shape[0])}


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


def test_uneven_token_counts() -> None:
    run_ranks(3, _check_round, dict(tokens=[5, 0, 9], hidden=8, topk=2, experts=6, routing="uniform", seed=13))
