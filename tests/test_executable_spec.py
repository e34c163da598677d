"""Tests of the executable spec (`reference/`) itself: hand-worked cases, self-describing data, orderings.

The expectations here are written out by hand from the SPEC text, not computed by the code under test, so
that the oracle every backend is compared with is itself checked against the SPEC.
"""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from reference import (
    cached_dispatch,
    combine,
    dispatch,
    fp8_cast,
    int8_cast,
    layout,
    low_latency_combine,
    low_latency_dispatch,
)

BF16 = torch.bfloat16
F32 = torch.float32
I32 = torch.int32


def _bits(t: torch.Tensor) -> list[int]:
    """float32 values as their bit patterns (distinguishes -0.0 from +0.0 and compares exactly)."""
    return t.to(F32).contiguous().view(torch.int32).flatten().tolist()


def _f32_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _t(rows: list, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# The hand-worked normal-mode case: R=2 ranks, N=3 tokens each, E=4 experts (L=2), K=2, C=2 channels.
# Rank 0 owns experts 0, 1; rank 1 owns experts 2, 3. Channel 0 = tokens 0-1, channel 1 = token 2.
# ---------------------------------------------------------------------------------------------------------
TOPK_IDX = [
    _t([[0, 2], [1, -1], [3, 2]], torch.int64),
    _t([[-1, -1], [2, 1], [0, 1]], torch.int64),
]
TOPK_WEIGHTS = [
    _t([[0.5, 0.25], [1.0, 0.75], [0.125, 2.0]], F32),  # 0.75 sits on a -1 entry: it is never delivered
    _t([[9.0, 9.0], [1.5, 2.5], [3.0, 4.0]], F32),
]
IN_RANK = [
    _t([[True, True], [True, False], [False, True]], torch.bool),
    _t([[False, False], [True, True], [True, False]], torch.bool),
]
PER_EXPERT = [_t([1, 1, 2, 1], I32), _t([1, 2, 1, 0], I32)]


def _hand_x(dtype: torch.dtype = F32) -> list[torch.Tensor]:
    # Row (s, t) = [s, t, 10*s + t + 1]: the value says where it came from.
    return [_t([[s, t, 10 * s + t + 1] for t in range(3)], dtype) for s in range(2)]


def _hand_dispatch(**kwargs) -> list[dict]:
    return dispatch(
        _hand_x(),
        IN_RANK,
        PER_EXPERT,
        topk_idx=TOPK_IDX,
        topk_weights=TOPK_WEIGHTS,
        num_experts=4,
        num_channels=2,
        **kwargs,
    )


def test_layout_by_hand():
    out = layout(TOPK_IDX, num_experts=4)
    assert out[0]["num_tokens_per_rank"].tolist() == [2, 2]
    assert out[1]["num_tokens_per_rank"].tolist() == [2, 1]
    assert out[0]["num_tokens_per_expert"].tolist() == [1, 1, 2, 1]
    assert out[1]["num_tokens_per_expert"].tolist() == [1, 2, 1, 0]  # rank 1 token 2 picks 0 and 1: counted 1+1
    for r in range(2):
        assert out[r]["num_tokens_per_rdma_rank"] is None
        assert out[r]["num_tokens_per_rank"].dtype == I32 and out[r]["num_tokens_per_expert"].dtype == I32
        assert torch.equal(out[r]["is_token_in_rank"], IN_RANK[r])
    # int32 ids give the same answer.
    out32 = layout([t.to(torch.int32) for t in TOPK_IDX], num_experts=4)
    assert out32[1]["num_tokens_per_expert"].tolist() == [1, 2, 1, 0]


def test_layout_counts_once_per_rank_and_per_node():
    # R=10 ranks (2 nodes: ranks 0-7 and the partial node 8-9), E=10 (one expert per rank).
    idx = [_t([[0, 1], [8, 9], [7, 8], [-1, -1]], torch.int64)] + [torch.zeros((0, 2), dtype=torch.int64)] * 9
    out = layout(idx, num_experts=10)
    assert out[0]["num_tokens_per_rank"].tolist() == [1, 1, 0, 0, 0, 0, 0, 1, 2, 1]
    assert out[0]["num_tokens_per_rdma_rank"].tolist() == [2, 2]  # token 0 once on node 0; token 1 once on node 1
    assert out[1]["num_tokens_per_rdma_rank"].tolist() == [0, 0]
    assert out[1]["is_token_in_rank"].shape == (0, 10)
    # Two experts of one rank still count the token once for that rank.
    two = layout([_t([[0, 1]], torch.int64), _t([[3, -1]], torch.int64)], num_experts=4)
    assert two[0]["num_tokens_per_rank"].tolist() == [1, 0]
    assert two[0]["num_tokens_per_expert"].tolist() == [1, 1, 0, 0]


def test_layout_rejects_bad_expert_ids():
    with pytest.raises(ValueError, match="outside"):
        layout([_t([[4]], torch.int64), _t([[0]], torch.int64)], num_experts=4)
    with pytest.raises(ValueError, match="outside"):
        layout([_t([[-2]], torch.int64), _t([[0]], torch.int64)], num_experts=4)
    with pytest.raises(ValueError, match="multiple"):
        layout([_t([[0]], torch.int64), _t([[0]], torch.int64)], num_experts=3)


def test_dispatch_by_hand():
    out = _hand_dispatch()
    r0, r1 = out
    # Receive order: sources ascending, then token ascending.
    assert r0["recv_x"].tolist() == [[0, 0, 1], [0, 1, 2], [1, 1, 12], [1, 2, 13]]
    assert r1["recv_x"].tolist() == [[0, 0, 1], [0, 2, 3], [1, 1, 12]]
    assert r0["recv_src_idx"].tolist() == [0, 1, 1, 2]
    assert r1["recv_src_idx"].tolist() == [0, 2, 1]
    # Local expert ids (global - r*L) where local, else -1; weights 0.0 where not local.
    assert r0["recv_topk_idx"].tolist() == [[0, -1], [1, -1], [-1, 1], [0, 1]]
    assert r1["recv_topk_idx"].tolist() == [[-1, 0], [1, 0], [0, -1]]
    assert r0["recv_topk_weights"].tolist() == [[0.5, 0.0], [1.0, 0.0], [0.0, 2.5], [3.0, 4.0]]
    assert r1["recv_topk_weights"].tolist() == [[0.0, 0.25], [0.125, 2.0], [1.5, 0.0]]
    assert r0["recv_topk_idx"].dtype == torch.int64 and r0["recv_topk_weights"].dtype == F32
    assert r0["num_recv_tokens_per_expert_list"] == [2, 3]
    assert r1["num_recv_tokens_per_expert_list"] == [3, 1]
    # Handle items.
    for r in range(2):
        assert out[r]["rank_prefix_matrix"].tolist() == [[2, 2], [4, 3]]
        assert torch.equal(out[r]["is_token_in_rank"], IN_RANK[r])
        for key in ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "recv_src_idx"):
            assert out[r][key].dtype == I32
    assert r0["channel_prefix_matrix"].tolist() == [[2, 2], [1, 2]]
    assert r1["channel_prefix_matrix"].tolist() == [[1, 2], [1, 1]]
    assert r0["recv_channel_prefix_matrix"].tolist() == [[0, 2], [0, 1]]  # within each source's block
    assert r1["recv_channel_prefix_matrix"].tolist() == [[0, 1], [0, 1]]
    assert r0["send_head"].tolist() == [[0, 0], [1, -1], [-1, 0]]
    assert r1["send_head"].tolist() == [[-1, -1], [0, 0], [0, -1]]


def test_dispatch_send_head_restarts_per_channel():
    # With one channel rank 0's token 2 is the second token sent to rank 1; with two it opens channel 1.
    one = dispatch(_hand_x(), IN_RANK, PER_EXPERT, num_channels=1)
    assert one[0]["send_head"].tolist() == [[0, 0], [1, -1], [-1, 1]]
    assert one[0]["channel_prefix_matrix"].tolist() == [[2], [2]]
    assert one[1]["recv_channel_prefix_matrix"].tolist() == [[0], [0]]
    assert one[0]["recv_topk_idx"] is None and one[0]["recv_topk_weights"] is None
    # More channels than tokens: empty channels repeat the inclusive prefix.
    many = dispatch(_hand_x(), IN_RANK, PER_EXPERT, num_channels=4)
    assert many[0]["channel_prefix_matrix"].tolist() == [[1, 2, 2, 2], [1, 1, 2, 2]]
    assert many[0]["send_head"].tolist() == [[0, 0], [0, -1], [-1, 0]]
    assert many[1]["recv_channel_prefix_matrix"].tolist() == [[0, 1, 1, 2], [0, 0, 1, 1]]


def test_dispatch_expert_alignment_rounds_counts_only():
    out = _hand_dispatch(expert_alignment=2)
    assert out[0]["num_recv_tokens_per_expert_list"] == [2, 4]
    assert out[1]["num_recv_tokens_per_expert_list"] == [4, 2]
    assert out[0]["recv_x"].shape[0] == 4  # not padded


def test_dispatch_num_worst_tokens_pads():
    out = _hand_dispatch(num_worst_tokens=5)
    r0 = out[0]
    assert r0["recv_x"].tolist() == [[0, 0, 1], [0, 1, 2], [1, 1, 12], [1, 2, 13], [0, 0, 0]]
    assert r0["recv_topk_idx"].tolist()[4] == [-1, -1]
    assert r0["recv_topk_weights"].tolist()[4] == [0.0, 0.0]
    assert r0["recv_src_idx"].tolist() == [0, 1, 1, 2, -1]
    assert out[1]["recv_src_idx"].tolist() == [0, 2, 1, -1, -1]
    assert r0["num_recv_tokens_per_expert_list"] == []
    with pytest.raises(ValueError, match="num_worst_tokens"):
        _hand_dispatch(num_worst_tokens=3)  # rank 0 receives 4


def test_dispatch_tuple_x_travels_row_by_row():
    x_q = [torch.arange(6, dtype=F32).reshape(3, 2).add(10 * s).to(torch.float8_e4m3fn) for s in range(2)]
    # Non-contiguous scales (a transposed view); received scales must come out contiguous.
    scales = [torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).add(100 * s).t() for s in range(2)]
    assert not scales[0].is_contiguous()
    out = dispatch(list(zip(x_q, scales, strict=True)), IN_RANK, PER_EXPERT, num_channels=2)
    q1, s1 = out[1]["recv_x"]
    assert q1.dtype == torch.float8_e4m3fn and s1.is_contiguous()
    assert q1.float().tolist() == [[0, 1], [4, 5], [12, 13]]  # rows (0,0), (0,2), (1,1)
    assert s1.tolist() == [[1.0, 4.0], [3.0, 6.0], [102.0, 105.0]]
    # 1-D scales and cached dispatch route the same way.
    flat = [torch.tensor([0.5, 1.5, 2.5]) + s for s in range(2)]
    cached = cached_dispatch(list(zip(x_q, flat, strict=True)), IN_RANK, num_worst_tokens=4)
    assert cached[1][1].tolist() == [0.5, 2.5, 2.5, 0.0]


def test_cached_dispatch_matches_dispatch():
    grads = [torch.randn(3, 5, generator=torch.Generator().manual_seed(s)).to(torch.float16) for s in range(2)]
    first = dispatch(grads, IN_RANK, PER_EXPERT)
    again = cached_dispatch(grads, [first[r]["is_token_in_rank"] for r in range(2)])
    for r in range(2):
        assert torch.equal(first[r]["recv_x"], again[r])


def test_combine_by_hand():
    disp = _hand_dispatch()
    out = combine([d["recv_x"] for d in disp], IN_RANK, topk_weights=[d["recv_topk_weights"] for d in disp])
    # Each token comes back once per destination rank and the copies are summed (no weights applied).
    assert out[0]["combined_x"].tolist() == [[0, 0, 2], [0, 1, 2], [0, 2, 3]]
    assert out[1]["combined_x"].tolist() == [[0, 0, 0], [2, 2, 24], [1, 2, 13]]  # token 0 went nowhere
    # Weights reassemble; a weight on a -1 entry comes back as 0.0.
    assert out[0]["combined_topk_weights"].tolist() == [[0.5, 0.25], [1.0, 0.0], [0.125, 2.0]]
    assert out[1]["combined_topk_weights"].tolist() == [[0.0, 0.0], [1.5, 2.5], [3.0, 4.0]]
    # Padding rows past num_recv are never read.
    padded = [torch.cat([d["recv_x"], torch.full((2, 3), 1e30)]) for d in disp]
    again = combine(padded, IN_RANK)
    assert again[0]["combined_x"].tolist() == out[0]["combined_x"].tolist()
    assert again[0]["combined_topk_weights"] is None
    # A bias is added even for a token that went nowhere.
    bias = [None, (torch.ones(3, 3), torch.full((3, 3), 2.0))]
    biased = combine([d["recv_x"] for d in disp], IN_RANK, bias=bias)
    assert biased[1]["combined_x"].tolist() == [[3, 3, 3], [5, 5, 27], [4, 5, 16]]
    assert biased[0]["combined_x"].tolist() == out[0]["combined_x"].tolist()


def test_combine_sums_bias_then_ranks_ascending():
    big = 2.0**24  # 2**24 + 1 is not a float32: adding 1 to 2**24 rounds (to even) back to 2**24
    # R=3: token 0 of rank 0 goes to every rank; the ranks return 1, 1, 2**24.
    in_rank = [_t([[True, True, True]], torch.bool)] + [torch.zeros((0, 3), dtype=torch.bool)] * 2
    x = [_t([[1.0]], F32), _t([[1.0]], F32), _t([[big]], F32)]
    got = combine(x, in_rank)[0]["combined_x"].item()
    assert got == big + 2  # ascending: (1 + 1) + 2**24; descending would give 2**24
    # bias_0, bias_1 come before the rows: (1 + 1) + 2**24, where rows first would give 2**24.
    got = combine([_t([[big]], F32)], [_t([[True]], torch.bool)], bias=[(_t([[1.0]], F32), _t([[1.0]], F32))])
    assert got[0]["combined_x"].item() == big + 2
    # A pair may leave a place empty (DeepEP unpacks `bias_0, bias_1 = bias`, either None): the other is added.
    for pair in ((None, _t([[3.0]], F32)), (_t([[3.0]], F32), None)):
        assert combine([_t([[4.0]], F32)], [_t([[True]], torch.bool)], bias=[pair])[0]["combined_x"].item() == 7.0
    # The fp32 weight sum runs over destinations ascending too.
    w = [_t([[1.0]], F32), _t([[1.0]], F32), _t([[big]], F32)]
    assert combine(x, in_rank, topk_weights=w)[0]["combined_topk_weights"].item() == big + 2


def test_combine_rounds_once_and_starts_from_plus_zero():
    # bf16: 1 + 2**-8 + 2**-8 = 1 + 2**-7 in fp32, a bf16 value; rounding after each add would stick at 1.0.
    one, tiny = _t([[1.0]], BF16), _t([[2.0**-8]], BF16)
    got = combine([tiny], [_t([[True]], torch.bool)], bias=[(one, tiny)])[0]["combined_x"]
    assert got.dtype == BF16 and got.item() == 1.0 + 2.0**-7
    # float16 is rounded once too: 1 + 2**-11 + 2**-11 = 1 + 2**-10.
    one16, tiny16 = _t([[1.0]], torch.float16), _t([[2.0**-11]], torch.float16)
    got = combine([tiny16], [_t([[True]], torch.bool)], bias=[(one16, tiny16)])[0]["combined_x"]
    assert got.dtype == torch.float16 and got.item() == 1.0 + 2.0**-10
    # The sum starts from +0.0, so a single -0.0 row comes back as +0.0.
    got = combine([_t([[-0.0]], F32)], [_t([[True]], torch.bool)])[0]["combined_x"]
    assert _bits(got) == [0]
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        combine([_t([[1]], torch.int32)], [_t([[True]], torch.bool)])


# ---------------------------------------------------------------------------------------------------------
# Self-describing random cases (DeepEP style): value = source rank, last column = token index.
# ---------------------------------------------------------------------------------------------------------
def _random_routing(seed: int, num_ranks: int, num_experts: int, num_topk: int, max_tokens: int):
    g = torch.Generator().manual_seed(seed)
    topk_idx, topk_weights, x = [], [], []
    for s in range(num_ranks):
        n = int(torch.randint(0, max_tokens + 1, (1,), generator=g))
        scores = torch.rand(n, num_experts, generator=g)
        idx = scores.topk(num_topk, dim=1).indices
        idx[torch.rand(n, num_topk, generator=g) < 0.2] = -1  # some "no expert" entries
        topk_idx.append(idx)
        # Dyadic weights keep every sum in this test exact.
        topk_weights.append(torch.randint(1, 8, (n, num_topk), generator=g).to(F32) / 4)
        rows = torch.full((n, 4), float(s), dtype=BF16)
        rows[:, -1] = torch.arange(n, dtype=BF16)
        x.append(rows)
    return topk_idx, topk_weights, x


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_ranks=st.integers(1, 4),
    experts_per_rank=st.integers(1, 3),
    num_topk=st.integers(1, 3),
    num_channels=st.integers(1, 4),
)
def test_dispatch_combine_self_describing(seed, num_ranks, experts_per_rank, num_topk, num_channels):
    num_experts = num_ranks * experts_per_rank
    num_topk = min(num_topk, num_experts)
    topk_idx, topk_weights, x = _random_routing(seed, num_ranks, num_experts, num_topk, max_tokens=6)
    lay = layout(topk_idx, num_experts)
    out = dispatch(
        x,
        [lo["is_token_in_rank"] for lo in lay],
        [lo["num_tokens_per_expert"] for lo in lay],
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        num_experts=num_experts,
        num_channels=num_channels,
    )
    for r in range(num_ranks):
        o = out[r]
        prefix = o["rank_prefix_matrix"]
        num_recv = int(prefix[-1, r])
        assert o["recv_x"].shape == (num_recv, 4)
        assert num_recv == sum(int(lay[s]["num_tokens_per_rank"][r]) for s in range(num_ranks))
        for i in range(num_recv):
            s = int((prefix[:, r] <= i).sum())  # rows [prefix[s-1, r], prefix[s, r]) come from rank s
            t = int(o["recv_src_idx"][i])
            assert o["recv_x"][i, 0].item() == s and o["recv_x"][i, -1].item() == t
            assert bool(lay[s]["is_token_in_rank"][t, r])
            for k in range(num_topk):
                e = int(topk_idx[s][t, k])
                local = e >= 0 and e // experts_per_rank == r
                assert int(o["recv_topk_idx"][i, k]) == (e - r * experts_per_rank if local else -1)
        # Within a source, tokens ascend.
        for s in range(num_ranks):
            lo = int(prefix[s - 1, r]) if s > 0 else 0
            src = o["recv_src_idx"][lo : int(prefix[s, r])].tolist()
            assert src == sorted(src) and len(set(src)) == len(src)
        # recv_channel_prefix_matrix[s, c] is where source s's channel c starts within source s's block of rows
        # (DeepEP's meaning: its combine adds the block's start, rank_prefix_matrix[s - 1, r]).
        for s in range(num_ranks):
            n_s = x[s].shape[0]
            block = int(prefix[s - 1, r]) if s > 0 else 0
            for c in range(num_channels):
                start, end = reference.channel_range(c, n_s, num_channels)
                rows = [i for i in range(num_recv) if start <= int(o["recv_src_idx"][i]) < end]
                rows = [i for i in rows if int((prefix[:, r] <= i).sum()) == s]
                if rows:
                    assert rows[0] == block + int(o["recv_channel_prefix_matrix"][s, c])
        # send_head counts per (channel, destination) and the last channel's prefix totals the rank's sends.
        assert o["channel_prefix_matrix"][:, -1].tolist() == lay[r]["num_tokens_per_rank"].tolist()
        assert torch.equal(o["send_head"] >= 0, lay[r]["is_token_in_rank"])
        assert sum(o["num_recv_tokens_per_expert_list"]) == sum(
            int(lay[s]["num_tokens_per_expert"][r * experts_per_rank + i])
            for s in range(num_ranks)
            for i in range(experts_per_rank)
        )

    back = combine(
        [o["recv_x"] for o in out],
        [o["is_token_in_rank"] for o in out],
        topk_weights=[o["recv_topk_weights"] for o in out],
    )
    for s in range(num_ranks):
        num_dest = lay[s]["is_token_in_rank"].sum(dim=1, keepdim=True).to(F32)
        assert torch.equal(back[s]["combined_x"].float(), x[s].float() * num_dest)
        assert torch.equal(back[s]["combined_topk_weights"], torch.where(topk_idx[s] >= 0, topk_weights[s], 0.0))

    # Cached dispatch routes combine's output back the same way: each row is its token times its fan-out.
    redo = cached_dispatch([b["combined_x"] for b in back], [o["is_token_in_rank"] for o in out])
    for r in range(num_ranks):
        prefix = out[r]["rank_prefix_matrix"]
        for i, t in enumerate(out[r]["recv_src_idx"].tolist()):
            s = int((prefix[:, r] <= i).sum())
            fan_out = int(lay[s]["is_token_in_rank"][t].sum())
            assert torch.equal(redo[r][i].float(), out[r]["recv_x"][i].float() * fan_out)


# ---------------------------------------------------------------------------------------------------------
# Low-latency mode.
# ---------------------------------------------------------------------------------------------------------
def test_low_latency_dispatch_by_hand():
    # R=2, E=4 (L=2), T=3. Rank 1's token 2 picks experts 0 and 1 of rank 0: it arrives twice there.
    x = [_t([[s, t] for t in range(3)], BF16) for s in range(2)]
    out = low_latency_dispatch(x, TOPK_IDX, num_max_dispatch_tokens_per_rank=3, num_experts=4, use_fp8=False)
    r0, r1 = out
    assert r0["recv_x"].shape == (2, 6, 2) and r0["recv_x"].dtype == BF16
    assert r0["recv_count"].tolist() == [2, 3] and r1["recv_count"].tolist() == [3, 1]
    assert r0["recv_count"].dtype == I32 and r0["src_info"].dtype == I32 and r0["layout_range"].dtype == torch.int64
    # Rows per local expert: source rank, then t, then k ascending; unused rows zero (src_info 0).
    assert r0["recv_x"][0].tolist() == [[0, 0], [1, 2], [0, 0], [0, 0], [0, 0], [0, 0]]
    assert r0["recv_x"][1].tolist() == [[0, 1], [1, 1], [1, 2], [0, 0], [0, 0], [0, 0]]
    assert r1["recv_x"][0].tolist() == [[0, 0], [0, 2], [1, 1], [0, 0], [0, 0], [0, 0]]
    assert r1["recv_x"][1].tolist() == [[0, 2], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0]]
    assert r0["src_info"].tolist() == [[0, 2, 0, 0, 0, 0], [1, 1, 2, 0, 0, 0]]
    assert r1["src_info"].tolist() == [[0, 2, 1, 0, 0, 0], [2, 0, 0, 0, 0, 0]]
    assert r0["layout_range"].tolist() == [[(0 << 32) | 1, (1 << 32) | 1], [(0 << 32) | 1, (1 << 32) | 2]]
    assert r1["layout_range"].tolist() == [[(0 << 32) | 2, (2 << 32) | 1], [(0 << 32) | 1, (1 << 32) | 0]]


def test_low_latency_combine_by_hand():
    x = [_t([[s, t] for t in range(3)], BF16) for s in range(2)]
    disp = low_latency_dispatch(x, TOPK_IDX, 3, 4, use_fp8=False)
    # Each expert doubles its rows for rank 0's experts and triples them on rank 1's.
    y = [disp[0]["recv_x"] * 2, disp[1]["recv_x"] * 3]
    out = low_latency_combine(y, TOPK_IDX, TOPK_WEIGHTS, 3)
    # Rank 0 t0: 0.5*2*x + 0.25*3*x; t1: 1.0*2*x (k=1 is -1); t2: 0.125*3*x + 2.0*3*x.
    assert out[0].tolist() == [[0, 0], [0, 2], [0, 2 * 6.375]]
    # Rank 1 t0: no expert -> zeros; t1: 1.5*3*x + 2.5*2*x; t2: 3*2*x + 4*2*x.
    assert out[1].tolist() == [[0, 0], [9.5, 9.5], [14, 28]]
    assert out[0].dtype == BF16


def test_low_latency_combine_order_and_no_fma():
    big = 2.0**24
    # R=1, E=4, one token with experts [3, 0, 2, 1]; expert e returns rows[e]. In k order the terms are
    # 2**24, 1, 1, -2**24: (2**24 + 1 -> 2**24) + 1 -> 2**24, - 2**24 = 0. In expert order they are
    # 1, -2**24, 1, 2**24, which sums to 2.
    idx = [_t([[3, 0, 2, 1]], torch.int64)]
    w = [_t([[1.0, 1.0, 1.0, -1.0]], F32)]
    y = [_t([[[1.0]], [[big]], [[1.0]], [[big]]], BF16)]
    assert low_latency_combine(y, idx, w, 1)[0].item() == 0.0
    # Product rounded, then added: (1 + 2**-23)(1 + 2**-7) rounds to 1 + 2**-7 + 2**-23 (the 2**-30 is lost),
    # and the second term is its exact negation, so the sum is 0; an FMA would keep -2**-30.
    a = 1.0 + 2.0**-23
    idx = [_t([[0, 1]], torch.int64)]
    w = [_t([[a, -a]], F32)]
    y = [_t([[[1.0 + 2.0**-7]], [[1.0 + 2.0**-7]]], BF16)]
    got = low_latency_combine(y, idx, w, 1)[0]
    assert _bits(got) == [0]


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_ranks=st.integers(1, 3),
    experts_per_rank=st.integers(1, 3),
    num_topk=st.integers(1, 3),
)
def test_low_latency_self_describing(seed, num_ranks, experts_per_rank, num_topk):
    num_experts = num_ranks * experts_per_rank
    num_topk = min(num_topk, num_experts)
    topk_idx, topk_weights, x = _random_routing(seed, num_ranks, num_experts, num_topk, max_tokens=5)
    out = low_latency_dispatch(x, topk_idx, 5, num_experts, use_fp8=False)
    for d in range(num_ranks):
        o = out[d]
        for i in range(experts_per_rank):
            e = d * experts_per_rank + i
            count = int(o["recv_count"][i])
            expected = [
                (s, t) for s in range(num_ranks) for t, row in enumerate(topk_idx[s].tolist()) for v in row if v == e
            ]
            assert count == len(expected)
            got = [(int(o["recv_x"][i, j, 0].item()), int(o["src_info"][i, j])) for j in range(count)]
            assert got == expected
            assert o["recv_x"][i, count:].abs().sum().item() == 0
            for s in range(num_ranks):
                packed = int(o["layout_range"][i, s])
                begin, n = packed >> 32, packed & 0xFFFFFFFF
                assert [src for src, _ in expected[begin : begin + n]] == [s] * n
                assert n == sum(1 for src, _ in expected if src == s)
    back = low_latency_combine([o["recv_x"] for o in out], topk_idx, topk_weights, 5)
    for s in range(num_ranks):
        w_sum = torch.where(topk_idx[s] >= 0, topk_weights[s], 0.0).sum(dim=1, keepdim=True)
        assert torch.equal(back[s].float(), x[s].float() * w_sum)  # small dyadic values: exact


def test_low_latency_fp8_and_int8_layouts():
    g = torch.Generator().manual_seed(7)
    x = [torch.randn(2, 512, generator=g).to(BF16) for _ in range(2)]
    idx = [_t([[0, 3], [1, -1]], torch.int64), _t([[2, 1], [-1, -1]], torch.int64)]
    num_rows = 2 * 2  # R*T

    fp8 = low_latency_dispatch(x, idx, 2, 4)
    q, scales = fp8[0]["recv_x"]
    assert q.shape == (2, num_rows, 512) and q.dtype == torch.float8_e4m3fn
    assert scales.shape == (2, num_rows, 4) and scales.stride() == (num_rows * 4, 1, num_rows)
    ref_q, ref_s = fp8_cast(x[1])
    # Rank 0 expert 1 rows: (0, 1, 0), then (1, 0, 1).
    assert torch.equal(q[1, 1].view(torch.uint8), ref_q[0].view(torch.uint8))
    assert torch.equal(scales[1, 1], ref_s[0])
    assert q[1, 2:].view(torch.uint8).sum().item() == 0 and scales[1, 2:].sum().item() == 0

    ue = low_latency_dispatch(x, idx, 2, 4, round_scale=True, use_ue8m0=True)
    _, packed = ue[1]["recv_x"]
    assert packed.dtype == I32 and packed.shape == (2, num_rows, 1) and packed.stride() == (num_rows, 1, num_rows)
    assert torch.equal(packed[0, 0], fp8_cast(x[1], round_scale=True, use_ue8m0=True)[1][0])  # row (1, 0, 0)

    i8 = low_latency_dispatch(x, idx, 2, 4, quant="int8")
    q8, s8 = i8[1]["recv_x"]
    assert q8.dtype == torch.int8 and s8.shape == (2, num_rows) and s8.dtype == F32
    ref_q8, ref_s8 = int8_cast(x[1])
    assert torch.equal(q8[0, 0], ref_q8[0]) and s8[0, 0].item() == ref_s8[0].item()  # row (1, 0, 0)
    assert torch.equal(q8[1, 0], int8_cast(x[0])[0][0])  # rank 1 expert 1 row 0 is (0, 0, 1)

    with pytest.raises(ValueError, match="round_scale"):
        low_latency_dispatch(x, idx, 2, 4, use_ue8m0=True)
    with pytest.raises(ValueError, match="apply only to the fp8 format"):  # as deep_ep.Buffer, not ignored
        low_latency_dispatch(x, idx, 2, 4, quant="int8", round_scale=True)
    # Without use_fp8 there are no scales: DeepEP ignores both flags (SGLang's bf16 dispatch passes them).
    plain = low_latency_dispatch(x, idx, 2, 4, use_fp8=False)
    flagged = low_latency_dispatch(x, idx, 2, 4, use_fp8=False, round_scale=True, use_ue8m0=True)
    for want, got in zip(plain, flagged):
        assert all(torch.equal(want[key], got[key]) for key in want)
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank"):
        low_latency_dispatch(x, idx, 1, 4)
    with pytest.raises(ValueError, match="multiple of 512"):
        low_latency_dispatch([t[:, :128] for t in x], idx, 2, 4, round_scale=True, use_ue8m0=True)


# ---------------------------------------------------------------------------------------------------------
# Casts, worked by hand (SPEC 6.1 and 6.2).
# ---------------------------------------------------------------------------------------------------------
def _block_row(values: list[float], hidden: int = 128) -> list[float]:
    return values + [0.0] * (hidden - len(values))


def test_fp8_cast_by_hand():
    rows = [
        # amax 448: scale 1, scale_inv = 448 * fp32(1/448) = 1.0. 17 and 19 are e4m3 ties (spacing 2 in
        # [16, 32)): even mantissas give 16 and 20. Subnormal ties (spacing 2**-9): 2**-10 -> 0,
        # 3 * 2**-10 -> 2**-8, -5 * 2**-10 -> -2**-8.
        _block_row([448.0, 17.0, 19.0, 2.0**-10, 3 * 2.0**-10, -5 * 2.0**-10]),
        # amax 896: scale 0.5, scale_inv 2.0; 35 * 0.5 = 17.5 -> 18 (not a tie).
        _block_row([896.0, 35.0]),
        # amax floored at fp32(1e-4): scale_inv = fp32(1e-4) * fp32(1/448), bits 0x346facad.
        _block_row([]),
        # amax 3: fp32(448 / 3) * 3 rounds (a tie, to even) to exactly 448: the largest element saturates.
        _block_row([3.0, -3.0, 1.5]),
        # 0.054931640625 / 0.0615234375 * 448 = 400 exactly, halfway between e4m3 384 and 416. The correctly
        # rounded fp32(448 / amax) lands the product on 400 (tie to even: 384); t.reciprocal() * 448 would
        # give a scale one ulp larger, a product above 400 and 416.
        _block_row([0.0615234375, 0.054931640625]),
    ]
    q, s = fp8_cast(_t(rows, BF16))
    assert q.dtype == torch.float8_e4m3fn and s.dtype == F32 and s.shape == (5, 1)
    qf = q.float()
    assert qf[0, :6].tolist() == [448.0, 16.0, 20.0, 0.0, 2.0**-8, -(2.0**-8)]
    assert qf[1, :2].tolist() == [448.0, 18.0]
    assert qf[2].abs().sum().item() == 0
    assert qf[3, :3].tolist() == [448.0, -448.0, 224.0]
    assert qf[4, :2].tolist() == [448.0, 384.0]
    assert _bits(s[:, 0]) == [0x3F800000, 0x40000000, 0x346FACAD, 0x3BDB6DB8, 0x39100000]


def test_fp8_cast_round_scale_and_ue8m0_by_hand():
    def blocks(amaxes: list[float]) -> list[float]:
        return [v for a in amaxes for v in _block_row([a])]

    # Block amax -> amax * fp32(1/448) -> 2**ceil(log2(.)): 450 -> 1.004.. -> 2.0; 448 -> exactly 1.0 -> 1.0;
    # 1 -> 2**-8.8.. -> 2**-8; 0 (floor 1e-4) -> 2**-22.09.. -> 2**-22. Exponent bytes 128, 127, 119, 105.
    x = _t([blocks([450.0, 448.0, 1.0, 0.0]), blocks([0.0, 448.0, 1.0, 450.0])], BF16)
    q, s = fp8_cast(x, round_scale=True)
    assert s.tolist() == [[2.0, 1.0, 2.0**-8, 2.0**-22], [2.0**-22, 1.0, 2.0**-8, 2.0]]
    # 450 * 0.5 = 225 -> 224 (e4m3 spacing 16 in [128, 256)); 1 * 2**8 = 256.
    assert q.float()[0, ::128].tolist() == [224.0, 448.0, 256.0, 0.0]
    q2, packed = fp8_cast(x, round_scale=True, use_ue8m0=True)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert packed.dtype == I32 and packed.shape == (2, 1)
    # Byte b of the word is block b's exponent, least significant first; byte 3 >= 128 makes it negative.
    assert packed[0, 0].item() == 128 | 127 << 8 | 119 << 16 | 105 << 24
    assert packed[1, 0].item() == 0x80777F69 - (1 << 32)
    with pytest.raises(ValueError, match="round_scale"):
        fp8_cast(x, use_ue8m0=True)


def test_fp8_cast_matches_a_vectorised_formulation():
    # An independent vectorised statement of SPEC 6.1, on values spanning many binades.
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 512, generator=g) * torch.logspace(-6, 6, 6).unsqueeze(1)).to(BF16)
    x[2, :128] = 0
    for round_scale in (False, True):
        blocks = x.float().view(6, 4, 128)
        amax = blocks.abs().amax(dim=2, keepdim=True).clamp(min=1e-4)
        inv448 = torch.ones(()) / torch.full((), 448.0)
        if round_scale:
            t = amax * inv448
            bits = t.view(torch.int32)
            exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
            scale_inv = ((exponent + 127) << 23).view(F32)
            scale = torch.ones_like(scale_inv) / scale_inv
        else:
            scale = torch.full_like(amax, 448.0) / amax
            scale_inv = amax * inv448
        want_q = (blocks * scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(6, 512)
        q, s = fp8_cast(x, round_scale=round_scale)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
        assert _bits(s) == _bits(scale_inv.view(6, 4))


def test_int8_cast_by_hand():
    x = _t(
        [
            [127.0, 0.5, -1.5, 2.5, -0.5, 0.0],  # s = 1: half-even ties 0.5 -> 0, -1.5 -> -2, 2.5 -> 2
            [254.0, 3.0, 5.0, -1.0, 7.0, 0.0],  # s = 0.5: 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, 3.5 -> 4; scale 2
            [0.0] * 6,  # s = 127 / fp32(1e-12); scale = 1 / s, bits 0x280dd87d
        ],
        BF16,
    )
    q, s = int8_cast(x)
    assert q.dtype == torch.int8 and s.dtype == F32 and s.shape == (3,)
    assert q.tolist() == [[127, 0, -2, 2, 0, 0], [127, 2, 2, 0, 4, 0], [0] * 6]
    assert _bits(s) == [0x3F800000, 0x40000000, 0x280DD87D]
    assert s[2].item() == _f32_from_bits(0x280DD87D)


def test_int8_cast_matches_a_vectorised_formulation():
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(8, 96, generator=g) * torch.logspace(-8, 8, 8).unsqueeze(1)).to(BF16)
    x[3] = 0
    amax = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    s = torch.full_like(amax, 127.0) / amax
    want_q = torch.round(x.float() * s).to(torch.int8)  # torch.round is half-to-even
    q, scales = int8_cast(x)
    assert torch.equal(q, want_q)
    assert _bits(scales) == _bits((torch.ones_like(s) / s).flatten())


def test_low_latency_refuses_a_token_that_selects_an_expert_twice():
    # docs/SEMANTICS.md: distinct experts per token in low-latency mode, as deep_ep.Buffer checks; repeated -1 is fine.
    x = [torch.ones(2, 16, dtype=BF16)]
    with pytest.raises(ValueError, match=r"topk_idx\[0\]\[1\] = \[1, -1, 1\] selects an expert twice"):
        low_latency_dispatch(x, [_t([[0, -1, -1], [1, -1, 1]], torch.int64)], 2, 2, use_fp8=False)
    out = low_latency_dispatch(x, [_t([[0, -1, -1], [1, -1, 0]], torch.int64)], 2, 2, use_fp8=False)
    assert out[0]["recv_count"].tolist() == [2, 1]
