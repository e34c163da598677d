"""deep_ep.permute: expert-grouped layout, weighted inverse, gradients (single process, no communication).

Forward results and both backward passes' row gradients are compared bit for bit with plain Python loops
that follow the documented order (fp32, and bf16/fp16, where an accumulation in the data's dtype would show);
the unpermute weight gradient is a dot product over H whose order is not part of the contract, so it is
checked by float64 gradcheck and against the loop oracle within the error bound of an fp32 sum. The `gpu`
tests at the end run on a GPU host: pytest -m gpu tests/test_permute.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deep_ep.permute import PermuteHandle, permute, unpermute
from deep_ep.testing.compare import assert_bit_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case(num_recv: int, hidden: int, num_topk: int, experts: int, *, seed: int, dtype=torch.float32, drop=0.4):
    """recv_x [M, H], recv_topk_idx [M, K] (local ids, about `drop` of them -1), weights float32 [M, K]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_recv, hidden, generator=gen).to(dtype)
    rows = [torch.randperm(max(experts, num_topk), generator=gen)[:num_topk] for _ in range(num_recv)]
    idx = (torch.stack(rows) if rows else torch.zeros(0, num_topk, dtype=torch.long)) % experts
    idx = torch.where(torch.rand(idx.shape, generator=gen) < drop, -1, idx)
    weights = torch.where(idx >= 0, torch.rand(idx.shape, generator=gen) + 0.1, 0.0)
    return x, idx.long(), weights


def _oracle_permute(x, idx, experts, align):
    """Rows per expert ascending, pairs (i, k) in order, each group zero-padded to a multiple of align."""
    rows, counts, where = [], [], {}
    for e in range(experts):
        pairs = [(i, k) for i in range(idx.shape[0]) for k in range(idx.shape[1]) if int(idx[i, k]) == e]
        for i, k in pairs:
            where[(i, k)] = len(rows)
            rows.append(x[i])
        padded = -(-len(pairs) // align) * align
        rows.extend([torch.zeros_like(x[0])] * (padded - len(pairs)) if x.shape[0] else [])
        counts.append(padded)
    out = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])
    return out, counts, where


def _oracle_unpermute(y, idx, weights, where, acc=torch.float32):
    """out[i] = sum over valid k ascending of acc(w) * acc(y[pos]) from +0.0, one rounding to y's dtype."""
    out = torch.zeros(idx.shape[0], y.shape[1], dtype=y.dtype)
    for i in range(idx.shape[0]):
        total = torch.zeros(y.shape[1], dtype=acc)
        for k in range(idx.shape[1]):
            if int(idx[i, k]) >= 0:
                total = total + weights[i, k].to(acc) * y[where[(i, k)]].to(acc)
        out[i] = total.to(y.dtype)
    return out


CASES = [
    dict(num_recv=7, hidden=5, num_topk=3, experts=4, align=1, seed=1),
    dict(num_recv=9, hidden=4, num_topk=2, experts=3, align=4, seed=2),
    dict(num_recv=6, hidden=3, num_topk=4, experts=4, align=3, seed=3, drop=0.0),
    dict(num_recv=5, hidden=2, num_topk=1, experts=2, align=2, seed=4),
    dict(num_recv=4, hidden=3, num_topk=2, experts=5, align=1, seed=5, drop=1.0),  # nothing local at all
    dict(num_recv=0, hidden=3, num_topk=2, experts=2, align=4, seed=6),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c['num_recv']}K{c['num_topk']}L{c['experts']}a{c['align']}")
def test_forward_matches_loop_oracle(case: dict, dtype: torch.dtype) -> None:
    x, idx, weights = _case(
        case["num_recv"],
        case["hidden"],
        case["num_topk"],
        case["experts"],
        seed=case["seed"],
        dtype=dtype,
        drop=case.get("drop", 0.4),
    )
    want_x, want_counts, where = _oracle_permute(x, idx, case["experts"], case["align"])
    for hint in (None, want_counts):
        got = permute(x, idx, case["experts"], expert_alignment=case["align"], num_tokens_per_expert=hint)
        assert_bit_equal("permuted_x", got.permuted_x, want_x)
        assert_bit_equal("tokens_per_expert", got.tokens_per_expert, torch.tensor(want_counts))
        real = [sum(int(v) == e for v in idx.reshape(-1)) for e in range(case["experts"])]
        assert_bit_equal("num_real_tokens_per_expert", got.handle.num_real_tokens_per_expert, torch.tensor(real))
    y = (torch.randn(got.permuted_x.shape, generator=torch.Generator().manual_seed(9)) * 3).to(dtype)
    assert_bit_equal("unpermute", unpermute(y, got.handle, weights), _oracle_unpermute(y, idx, weights, where))
    ones = torch.where(idx >= 0, 1.0, 0.0)
    assert_bit_equal("unpermute no weights", unpermute(y, got.handle), _oracle_unpermute(y, idx, ones, where))


def test_round_trip_restores_rows_with_one_local_expert() -> None:
    x, idx, _ = _case(8, 6, 3, 4, seed=7, drop=0.0)
    idx[:, 1:] = -1  # one local expert per row: unpermute(permute(x)) with weight 1 is x exactly
    got = permute(x, idx, 4, expert_alignment=4)
    assert_bit_equal("round trip", unpermute(got.permuted_x, got.handle), x)


def test_num_out_tokens_pads_the_tail_and_hints_are_checked() -> None:
    x, idx, weights = _case(6, 4, 2, 3, seed=8)
    exact = permute(x, idx, 3, expert_alignment=2)
    rows = exact.permuted_x.shape[0]
    fixed = permute(x, idx, 3, expert_alignment=2, num_out_tokens=rows + 5)
    assert fixed.permuted_x.shape[0] == rows + 5
    assert_bit_equal("groups", fixed.permuted_x[:rows], exact.permuted_x)
    assert_bit_equal("tail", fixed.permuted_x[rows:], torch.zeros(5, 4))
    just = permute(x, idx, 3, expert_alignment=2, num_out_tokens=rows)  # exactly the rows needed is enough
    assert_bit_equal("num_out_tokens == rows", just.permuted_x, exact.permuted_x)
    y = torch.randn(rows + 5, 4)
    assert_bit_equal(
        "unpermute ignores the tail", unpermute(y, fixed.handle, weights), unpermute(y[:rows], exact.handle, weights)
    )
    with pytest.raises(ValueError, match="num_out_tokens=.* is smaller"):
        permute(x, idx, 3, expert_alignment=2, num_out_tokens=rows - 1)
    wrong = exact.tokens_per_expert.tolist()
    wrong[0] += 2
    with pytest.raises(ValueError, match="does not match recv_topk_idx"):
        permute(x, idx, 3, expert_alignment=2, num_tokens_per_expert=wrong)
    with pytest.raises(ValueError, match="one per local expert"):
        permute(x, idx, 3, num_tokens_per_expert=[1, 2])


@pytest.mark.parametrize("bad", [-2, 3, 5])  # the ids just outside [-1, L) with L = 3, and one far out
def test_expert_ids_outside_minus_one_to_L_are_refused(bad: int) -> None:
    x, idx, _ = _case(4, 3, 2, 3, seed=9)
    idx[2, 1] = bad
    with pytest.raises(ValueError, match=rf"recv_topk_idx\[2, 1\] = {bad} is not a local expert id"):
        permute(x, idx, 3)
    with pytest.raises(ValueError, match="recv_topk_idx"):  # the size hints do not skip the check
        permute(x, idx, 3, num_out_tokens=8)


def test_argument_errors() -> None:
    x, idx, weights = _case(4, 3, 2, 3, seed=9)
    with pytest.raises(ValueError, match="rows but recv_x has"):
        permute(x[:3], idx, 3)
    with pytest.raises(TypeError, match="int64 or int32"):
        permute(x, idx.float(), 3)
    with pytest.raises(ValueError, match="expert_alignment=0"):
        permute(x, idx, 3, expert_alignment=0)
    got = permute(x, idx, 3)
    with pytest.raises(TypeError, match="PermuteHandle"):
        unpermute(got.permuted_x, (1, 2))
    with pytest.raises(ValueError, match="expert_out must be"):
        unpermute(got.permuted_x[1:], got.handle)
    with pytest.raises(ValueError, match="recv_topk_weights must be"):
        unpermute(got.permuted_x, got.handle, weights[:, :1])
    assert isinstance(got.handle, PermuteHandle)
    meta = torch.device("meta")  # a second device on any host
    with pytest.raises(ValueError, match="expert_out is on meta, but permute's handle is on cpu"):
        unpermute(got.permuted_x.to(meta), got.handle)
    with pytest.raises(ValueError, match="recv_topk_weights is on meta, but permute's handle is on cpu"):
        unpermute(got.permuted_x, got.handle, weights.to(meta))


def test_size_hints_must_be_host_ints() -> None:
    x, idx, _ = _case(6, 3, 2, 3, seed=9, drop=0.0)
    counts = permute(x, idx, 3).tokens_per_expert.tolist()
    with pytest.raises(TypeError, match=r"num_tokens_per_expert\[0\] must be an int, got float"):
        permute(x, idx, 3, num_tokens_per_expert=[float(n) for n in counts])
    with pytest.raises(TypeError, match="num_tokens_per_expert must be host ints"):
        permute(x, idx, 3, num_tokens_per_expert=torch.tensor(counts))
    with pytest.raises(ValueError, match=r"num_tokens_per_expert\[1\]=-1 must be >= 0"):
        permute(x, idx, 3, num_tokens_per_expert=[counts[0] + counts[1] + 1, -1, counts[2]])
    with pytest.raises(TypeError, match="num_out_tokens must be an int, got float"):
        permute(x, idx, 3, num_out_tokens=20.0)
    # Int-likes are taken as ints (as checks.integer does for Buffer's arguments): sizes stay host ints.
    got = permute(x, idx, 3, num_tokens_per_expert=np.array(counts), num_out_tokens=np.int64(sum(counts)))
    assert type(got.handle.num_rows) is int and got.handle.num_rows == sum(counts)


def test_permute_backward_sums_pairs_in_k_order() -> None:
    x, idx, _ = _case(7, 5, 3, 3, seed=10, drop=0.2)
    x.requires_grad_()
    got = permute(x, idx, 3, expert_alignment=2)
    grad = torch.randn(got.permuted_x.shape, generator=torch.Generator().manual_seed(11))
    got.permuted_x.backward(grad)
    _, _, where = _oracle_permute(x.detach(), idx, 3, 2)
    want = _oracle_unpermute(grad, idx, torch.where(idx >= 0, 1.0, 0.0), where)
    assert_bit_equal("grad_x", x.grad, want)


def test_unpermute_backward() -> None:
    x, idx, weights = _case(7, 5, 3, 3, seed=12, drop=0.2)
    got = permute(x, idx, 3, expert_alignment=4)
    y = torch.randn(got.permuted_x.shape, generator=torch.Generator().manual_seed(13)).requires_grad_()
    w = weights.clone().requires_grad_()
    grad = torch.randn(7, 5, generator=torch.Generator().manual_seed(14))
    unpermute(y, got.handle, w).backward(grad)
    _, _, where = _oracle_permute(x, idx, 3, 4)
    want_y = torch.zeros_like(y)
    want_w = torch.zeros_like(w)
    for (i, k), p in where.items():
        want_y[p] = weights[i, k] * grad[i]  # a single rounded product: exact to compare
        want_w[i, k] = (grad[i].double() * y[p].detach().double()).sum().float()
    assert_bit_equal("grad_y", y.grad, want_y)
    # A dot product over H: fp32 in an unspecified order, so within a few ulp of the float64 value.
    torch.testing.assert_close(w.grad, want_w, rtol=1e-6, atol=1e-6)
    assert_bit_equal("grad_w where nothing is local", w.grad[idx < 0], torch.zeros(int((idx < 0).sum())))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_backward_matches_loop_oracle(dtype: torch.dtype) -> None:
    # The documented arithmetic in bf16/fp16: each sum in fp32, one rounding (an accumulation in the data's
    # dtype, or a weight rounded to it, differs in the last bits).
    gen = torch.Generator().manual_seed(17)
    idx = torch.randint(-1, 3, (9, 4), generator=gen)  # a token may pick a local expert twice
    x = torch.randn(9, 16, generator=gen).to(dtype).requires_grad_()
    got = permute(x, idx, 3, expert_alignment=2)
    grad = torch.randn(got.permuted_x.shape, generator=gen).to(dtype)
    got.permuted_x.backward(grad)
    _, _, where = _oracle_permute(x.detach(), idx, 3, 2)
    assert_bit_equal("grad_x", x.grad, _oracle_unpermute(grad, idx, torch.where(idx >= 0, 1.0, 0.0), where))

    y = torch.randn(got.permuted_x.shape, generator=gen).to(dtype).requires_grad_()
    w = torch.rand(9, 4, generator=gen).requires_grad_()
    grad_out = torch.randn(9, 16, generator=gen).to(dtype)
    unpermute(y, got.handle, w).backward(grad_out)
    want_y = torch.zeros_like(y)
    for (i, k), row in where.items():
        want_y[row] = (w[i, k].detach() * grad_out[i].float()).to(dtype)  # fp32 weight times fp32, one rounding
    assert_bit_equal("grad_y", y.grad, want_y)
    for (i, k), row in where.items():  # a dot product over H in fp32: within the bound of any summation order
        terms = grad_out[i].double() * y[row].detach().double()  # each product exact in fp32
        bound = 16 * 2.0**-24 * float(terms.abs().sum())
        assert abs(float(w.grad[i, k]) - float(terms.sum())) <= bound, (i, k)


def test_slots_without_a_local_expert_are_never_read() -> None:
    # Weights and gradients of the slots that are -1 are not multiplied in (0 * nan would leak a nan).
    x, idx, weights = _case(6, 4, 3, 3, seed=18, drop=0.4)
    got = permute(x, idx, 3)
    y = torch.randn(got.permuted_x.shape, generator=torch.Generator().manual_seed(19)).requires_grad_()
    w = torch.where(idx >= 0, weights, float("nan")).requires_grad_()
    _, _, where = _oracle_permute(x, idx, 3, 1)
    out = unpermute(y, got.handle, w)
    assert_bit_equal("unpermute", out, _oracle_unpermute(y.detach(), idx, weights, where))
    grad = torch.full((6, 4), float("inf"))
    out.backward(grad)
    assert_bit_equal("grad_w of the -1 slots", w.grad[idx < 0], torch.zeros(int((idx < 0).sum())))


@pytest.mark.parametrize("align", [1, 3])
def test_gradcheck_float64(align: int) -> None:
    x, idx, weights = _case(5, 3, 3, 3, seed=15, dtype=torch.float64, drop=0.3)
    w = weights.double().requires_grad_()
    x.requires_grad_()
    scale = torch.randn(3, 3, generator=torch.Generator().manual_seed(16), dtype=torch.float64)

    def layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        got = permute(x, idx, 3, expert_alignment=align)
        # A different nonlinear map per expert, so that a row placed in the wrong group changes the result.
        outputs, start = [], 0
        for e, count in enumerate(got.tokens_per_expert.tolist()):
            outputs.append(torch.tanh(got.permuted_x[start : start + count] * scale[e]))
            start += count
        return unpermute(torch.cat(outputs), got.handle, w)

    assert torch.autograd.gradcheck(layer, (x, w), eps=1e-6, atol=1e-9, rtol=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    num_recv=st.integers(0, 6),
    num_topk=st.integers(1, 4),
    experts=st.integers(1, 4),
    align=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_property_layout_and_inverse(num_recv: int, num_topk: int, experts: int, align: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_recv, 3, generator=gen)
    idx = torch.randint(-1, experts, (num_recv, num_topk), generator=gen)  # repeats allowed: order (i, k)
    weights = torch.rand(num_recv, num_topk, generator=gen)
    want_x, want_counts, where = _oracle_permute(x, idx, experts, align)
    got = permute(x, idx, experts, expert_alignment=align, num_tokens_per_expert=want_counts)
    assert_bit_equal("permuted_x", got.permuted_x, want_x)
    assert got.tokens_per_expert.tolist() == want_counts
    y = torch.randn(got.permuted_x.shape, generator=gen)
    assert_bit_equal("unpermute", unpermute(y, got.handle, weights), _oracle_unpermute(y, idx, weights, where))


# ---- on a GPU host: pytest -m gpu tests/test_permute.py ----------------------------------------------------
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _hinted_step(x, idx, weights, grad, experts: int, align: int, hint: list[int]) -> tuple[torch.Tensor, ...]:
    """permute with the size hint, unpermute, and backward: outputs, grad_x and grad_w."""
    x = x.detach().requires_grad_()
    weights = weights.detach().requires_grad_()
    got = permute(x, idx, experts, expert_alignment=align, num_tokens_per_expert=hint)
    out = unpermute(got.permuted_x * 3, got.handle, weights)
    out.backward(grad)
    return got.permuted_x, got.tokens_per_expert, out, x.grad, weights.grad


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c['num_recv']}K{c['num_topk']}L{c['experts']}a{c['align']}")
def test_gpu_size_hints_do_not_synchronise_and_match_the_cpu(case: dict) -> None:
    _needs_cuda()
    experts, align = case["experts"], case["align"]
    x, idx, weights = _case(
        case["num_recv"], case["hidden"], case["num_topk"], experts, seed=case["seed"], drop=case.get("drop", 0.4)
    )
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(20))
    hint = _oracle_permute(x, idx, experts, align)[1]
    want = _hinted_step(x, idx, weights, grad, experts, align, hint)
    inputs = [t.cuda() for t in (x, idx, weights, grad)]  # copied before: a pageable copy synchronises
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        got = _hinted_step(*inputs, experts, align, hint)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for name, a, e in zip(("permuted_x", "tokens_per_expert", "unpermute", "grad_x"), got, want):
        assert_bit_equal(name, a.cpu(), e)
    torch.testing.assert_close(got[4].cpu(), want[4], rtol=1e-6, atol=1e-6)  # a dot product in another order


@pytest.mark.gpu
def test_gpu_permute_with_size_hints_is_captured_by_a_cuda_graph() -> None:
    _needs_cuda()
    x, idx, weights = _case(7, 5, 3, 4, seed=1)
    hint = _oracle_permute(x, idx, 4, 2)[1]
    static_x, idx_d, weights_d = x.cuda(), idx.cuda(), weights.cuda()

    def step() -> torch.Tensor:
        got = permute(static_x, idx_d, 4, expert_alignment=2, num_tokens_per_expert=hint)
        return unpermute(got.permuted_x * 3, got.handle, weights_d)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream before capture, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    new_x = torch.randn(x.shape, generator=torch.Generator().manual_seed(21))
    static_x.copy_(new_x.cuda())
    graph.replay()
    torch.cuda.synchronize()
    want = permute(new_x, idx, 4, expert_alignment=2)
    assert_bit_equal("replayed unpermute", out.cpu(), unpermute(want.permuted_x * 3, want.handle, weights))


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [-2, 3])
def test_gpu_bad_expert_id_is_a_device_assert_naming_recv_topk_idx(bad: int) -> None:
    # A device-side assert ends the process's CUDA context, so the failing call runs in a child process.
    _needs_cuda()
    script = (
        "import torch\n"
        "from deep_ep.permute import permute\n"
        f"idx = torch.tensor([[0, 1], [{bad}, -1], [2, 0]], device='cuda')\n"
        "permute(torch.ones(3, 4, device='cuda'), idx, 3, num_out_tokens=8)\n"
        "torch.cuda.synchronize()\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0, f"recv_topk_idx with {bad} was accepted:\n{run.stdout}{run.stderr}"
    assert "deep_ep.permute: recv_topk_idx" in run.stdout + run.stderr, run.stdout + run.stderr
