"""A fixed slice of the error-path fuzzer (tests/fuzz_errors.py), and regression tests for what it found."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import torch.distributed as dist
from fuzz_errors import fuzz

from deep_ep import Buffer, CollectiveMismatchError
from deep_ep.testing import run_ranks


@pytest.mark.parametrize(
    "backend,world,seeds",
    [
        ("reference", 2, range(0, 6)),
        ("reference", 3, range(6, 10)),
        pytest.param(
            "cuda_sim",
            2,
            range(0, 2),
            marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed"),
        ),
    ],
)
def test_fuzzed_corruptions_raise_on_every_rank_and_leave_the_buffer_exact(backend: str, world: int, seeds) -> None:
    calls, findings = fuzz(backend, world, list(seeds), steps=4, timeout=120)
    assert calls == 4 * len(seeds)
    assert not findings, "\n".join("seed {} step {} rank {}: {}".format(*f) for f in findings)


# ---- finding: comm_timeout took inf (or an unrepresentable number), and every later call failed mid-collective
def _timeouts(rank: int, world: int) -> list[str]:
    buffer = Buffer(dist.group.WORLD)
    seen = []
    for bad in (math.inf, math.nan, 1e12, -1.0, "5", True):
        with pytest.raises((TypeError, ValueError), match="comm_timeout") as info:
            buffer.comm_timeout = bad
        seen.append(type(info.value).__name__)
    assert buffer.comm_timeout == 300.0  # unchanged by the refused values
    buffer.comm_timeout = 1e6  # the longest taken
    idx = torch.tensor([[0], [1]])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 2)
    x = torch.arange(8.0).view(2, 4) + rank
    got = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    assert got[0].shape == (world, 4)
    return seen


def test_comm_timeout_refuses_what_a_wait_cannot_take() -> None:
    assert run_ranks(2, _timeouts, timeout=60)[0] == ["ValueError"] * 4 + ["TypeError"] * 2


def _bad_env(rank: int, world: int, name: str, value: str) -> str:
    if rank == world - 1:
        os.environ[name] = value
    with pytest.raises(ValueError) as info:
        Buffer(dist.group.WORLD, low_latency_mode=True)
    os.environ.pop(name, None)
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    assert (buffer.comm_timeout, buffer.nvshmem_qp_depth) == (300.0, 1024)
    return f"{type(info.value).__name__}: {info.value}"


# (and later: a bad NVSHMEM_QP_DEPTH was read after the agreement, with Python's int() message on that rank only)
@pytest.mark.parametrize("name,value", [("DEEP_EP_COMM_TIMEOUT", "inf"), ("NVSHMEM_QP_DEPTH", "abc")])
def test_a_bad_env_value_fails_every_rank_at_once(name: str, value: str) -> None:
    messages = run_ranks(2, _bad_env, name, value, timeout=60)
    assert name in messages[1] and value in messages[1], messages  # the variable and its value, named
    assert CollectiveMismatchError.__name__ in messages[0] and "rejected" in messages[0], messages


# ---- finding: get_local_buffer_tensor took a negative size (a silently shorter view) and failed on other bad
# arguments with torch's or Python's messages, none naming the argument
def _local_buffer(rank: int, world: int) -> list[str]:
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=64, num_rdma_bytes=32)
    seen = []
    for kwargs, name in [
        (dict(dtype="bf16"), "dtype"),
        (dict(dtype=torch.uint8, size=(-1,)), "size[0]"),
        (dict(dtype=torch.uint8, size=torch.Size([2, -3])), "size[1]"),
        (dict(dtype=torch.uint8, size=4), "size"),
        (dict(dtype=torch.uint8, use_rdma_buffer="no"), "use_rdma_buffer"),  # "no" read by its truth meant True
        (dict(dtype=torch.uint8, offset=2.0), "offset"),
    ]:
        with pytest.raises((TypeError, ValueError), match=name.replace("[", r"\[")):
            buffer.get_local_buffer_tensor(**kwargs)
        seen.append(name)
    view = buffer.get_local_buffer_tensor(torch.bfloat16, size=torch.Size([2, 3]), offset=4)
    assert view.shape == (2, 3) and view.data_ptr() == buffer.get_local_buffer_tensor(torch.uint8).data_ptr() + 4
    rdma = buffer.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True)
    assert buffer.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=1).data_ptr() == rdma.data_ptr()
    return seen


def test_get_local_buffer_tensor_names_its_bad_argument() -> None:
    assert len(run_ranks(1, _local_buffer, timeout=60)[0]) == 6


# ---- finding: flag arguments were read by their truth, so "no", "False" or 2 meant True (a string use_fp8 failed
# with int()'s message instead)
def _flags(rank: int, world: int) -> list[str]:
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    x, idx = torch.ones(2, 128, dtype=torch.bfloat16), torch.tensor([[0], [1]])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 2)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    calls = {
        "async_finish": lambda v: buffer.dispatch(x, async_finish=v, **layout),
        "allocate_on_comm_stream": lambda v: buffer.get_dispatch_layout(idx, 2, allocate_on_comm_stream=v),
        "use_fp8": lambda v: buffer.low_latency_dispatch(x, idx, 4, 2, use_fp8=v),
        "return_recv_hook": lambda v: buffer.low_latency_dispatch(x, idx, 4, 2, return_recv_hook=v),
    }
    seen = []
    for name, call in calls.items():
        for bad in ("no", None, 2):
            with pytest.raises(TypeError, match=f"{name} must be a bool"):
                call(bad)
        seen.append(name)
    recv, count, handle, _, hook = buffer.low_latency_dispatch(x, idx, 4, 2, use_fp8=0, return_recv_hook=1)
    hook()  # 0 and 1 (and numpy bools) are taken, as DeepEP's bindings take them
    assert isinstance(recv, torch.Tensor) and int(count.sum()) == world
    with pytest.raises(TypeError, match="zero_copy must be a bool"):
        buffer.low_latency_combine(recv, idx, torch.ones(2, 1), handle, zero_copy="no")
    for name in ("low_latency_mode", "allow_mnnvl", "use_fabric", "allow_nvlink_for_low_latency_mode"):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            Buffer(dist.group.WORLD, **{name: "no"})
    return seen


def test_flag_arguments_must_be_bools() -> None:
    assert len(run_ranks(2, _flags, timeout=60)[0]) == 4


# ---- finding (in this branch's flag checks, before they were merged): a bad flag on one rank raised before the
# call finished the previous call's deferred receive, which on the cuda backend holds a barrier: its peers waited
def _flag_after_async(rank: int, world: int) -> str:
    from deep_ep.testing import symm_mem_emulation

    symm_mem_emulation.register()
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True, backend="cuda_sim")
    buffer.comm_timeout = 10.0
    x, idx, weights = torch.ones(2, 128, dtype=torch.bfloat16), torch.tensor([[0], [1]]), torch.ones(2, 1)
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, 4, 2, use_fp8=False)
    buffer.low_latency_combine(recv, idx, weights, handle, async_finish=True)  # CPU: its receive is deferred
    with pytest.raises(ValueError if rank == 0 else TypeError) as info:
        buffer.low_latency_dispatch(x, idx, 4, 2, use_fp8="no" if rank == 1 else False)
    recv, count, handle, _, _ = buffer.low_latency_dispatch(x, idx, 4, 2, use_fp8=False)
    combined = buffer.low_latency_combine(recv, idx, weights, handle)[0]
    assert int(count.sum()) == world and torch.equal(combined, x)
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_a_bad_flag_on_one_rank_still_finishes_the_deferred_receive(tmp_path) -> None:
    env = {"DEEP_EP_SIM_DIR": str(tmp_path), "TRITON_INTERPRET": "1"}
    messages = run_ranks(2, _flag_after_async, env=env, timeout=60)
    assert "rejected" in messages[0] and "use_fp8 must be a bool" in messages[1], messages


# ---- finding: clean_low_latency_buffer checked its arguments before finishing a lost hook's receive, which on the
# cuda backend holds a barrier: a rank with a bad argument skipped it, its peers waited there, and its own next
# low-latency call raised "the hook ... was not called"
def _clean_with_a_lost_hook(rank: int, world: int) -> list[int]:
    from deep_ep.testing import symm_mem_emulation

    symm_mem_emulation.register()
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True, backend="cuda_sim")
    buffer.comm_timeout = 10.0
    x, idx, weights = torch.ones(2, 128, dtype=torch.bfloat16), torch.tensor([[0], [1]]), torch.ones(2, 1)
    _, count, _, _, _ = buffer.low_latency_dispatch(x, idx, 4, 2, use_fp8=False, return_recv_hook=True)  # hook lost
    if rank == 1:
        with pytest.raises(ValueError, match="num_experts"):
            buffer.clean_low_latency_buffer(4, 128, 3)
    else:
        buffer.clean_low_latency_buffer(4, 128, 2)
    received = count.tolist()  # the lost receive was taken on every rank
    recv, count, handle, _, _ = buffer.low_latency_dispatch(x, idx, 4, 2, use_fp8=False)
    assert torch.equal(buffer.low_latency_combine(recv, idx, weights, handle)[0], x)
    return received


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_clean_low_latency_buffer_takes_the_lost_receive_even_with_bad_arguments(tmp_path) -> None:
    env = {"DEEP_EP_SIM_DIR": str(tmp_path), "TRITON_INTERPRET": "1"}
    assert run_ranks(2, _clean_with_a_lost_hook, env=env, timeout=40) == [[2], [2]]


# ---- finding (review, twenty-sixth session): a sparse tensor or a lazy conjugate view passed every check, then failed
# inside the backend on its rank with torch's message, while its peers waited in the transfer until comm_timeout
def _odd_tensor_on_one_rank(rank: int, world: int, argument: str, kind: str) -> str:
    buffer = Buffer(dist.group.WORLD)
    buffer.comm_timeout = 60.0
    x = torch.arange(2 * 8, dtype=torch.float32).view(2, 8) + rank
    idx, weights = torch.tensor([[0], [1]]), torch.ones(2, 1)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 2)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=weights, **layout)

    def odd(t: torch.Tensor) -> torch.Tensor:
        if rank != 0:
            return t
        return t.to_sparse() if kind == "sparse" else t.conj()

    complex_x = torch.complex(x, -x)  # any dtype travels; a conjugate view needs a complex one
    calls = {
        "x": lambda: buffer.dispatch(odd(complex_x if kind == "conj" else x), **layout),
        "cached x": lambda: buffer.dispatch(odd(complex_x if kind == "conj" else x), handle=handle),
        "topk_weights": lambda: buffer.dispatch(x, topk_idx=idx, topk_weights=odd(weights), **layout),
        "combine x": lambda: buffer.combine(odd(recv_x), handle),
        "bias": lambda: buffer.combine(recv_x, handle, bias=odd(x)),
    }
    with pytest.raises((TypeError, CollectiveMismatchError)) as info:
        calls[argument]()
    assert torch.equal(buffer.combine(recv_x, handle)[0], x)  # the Buffer still moves data (each token to one rank)
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize(
    "argument,kind",
    [("x", "sparse"), ("x", "conj"), ("cached x", "conj"), ("topk_weights", "sparse"), ("combine x", "sparse"),
     ("bias", "sparse")],
)  # fmt: skip
def test_a_sparse_or_conjugate_view_argument_is_refused_before_any_transfer(argument: str, kind: str) -> None:
    messages = run_ranks(2, _odd_tensor_on_one_rank, argument, kind, timeout=60)
    name = argument.split()[-1]
    assert messages[0].startswith(f"TypeError: {name} ") and ("dense" in messages[0] or "conjugate" in messages[0])
    assert "CollectiveMismatchError" in messages[1] and "rejected" in messages[1], messages
