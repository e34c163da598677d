"""Public surface: DeepEP v1 signatures, Buffer attributes and statics, registry, events, seed user code."""

from __future__ import annotations

import copy
import inspect
import pickle
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import deep_ep
import reference
from deep_ep import Buffer, Config
from deep_ep.backends import (
    availability,
    base,
    get_backend_class,
    register_backend,
    select_backend,
    unregister_backend,
)
from deep_ep.backends.reference import ReferenceBackend
from deep_ep.testing import run_ranks
from deep_ep.testing.compare import assert_bit_equal
from deep_ep.testing.workloads import make_workload
from deep_ep.utils import EventHandle, EventOverlap, check_nvlink_connections

# DeepEP v1's parameter names, in order (deep_ep/buffer.py of deepseek-ai/DeepEP); clients feature-detect
# with inspect.signature, so names and order are API.
DEEPEP_SIGNATURES = {
    "__init__": [
        "self",
        "group",
        "num_nvl_bytes",
        "num_rdma_bytes",
        "low_latency_mode",
        "num_qps_per_rank",
        "allow_nvlink_for_low_latency_mode",
        "allow_mnnvl",
        "use_fabric",
        "explicitly_destroy",
        "enable_shrink",
        "comm",
    ],
    "get_dispatch_layout": [
        "self",
        "topk_idx",
        "num_experts",
        "previous_event",
        "async_finish",
        "allocate_on_comm_stream",
    ],
    "dispatch": [
        "self",
        "x",
        "handle",
        "num_tokens_per_rank",
        "num_tokens_per_rdma_rank",
        "is_token_in_rank",
        "num_tokens_per_expert",
        "topk_idx",
        "topk_weights",
        "expert_alignment",
        "num_worst_tokens",
        "config",
        "previous_event",
        "async_finish",
        "allocate_on_comm_stream",
    ],
    "combine": [
        "self",
        "x",
        "handle",
        "topk_weights",
        "bias",
        "config",
        "previous_event",
        "async_finish",
        "allocate_on_comm_stream",
    ],
    "low_latency_dispatch": [
        "self",
        "x",
        "topk_idx",
        "num_max_dispatch_tokens_per_rank",
        "num_experts",
        "cumulative_local_expert_recv_stats",
        "dispatch_wait_recv_cost_stats",
        "use_fp8",
        "round_scale",
        "use_ue8m0",
        "async_finish",
        "return_recv_hook",
    ],
    "low_latency_combine": [
        "self",
        "x",
        "topk_idx",
        "topk_weights",
        "handle",
        "use_logfmt",  # DeepEP 1.2's order (SPEC 6.3 lists the order from before use_logfmt was added)
        "zero_copy",
        "async_finish",
        "return_recv_hook",
        "out",
        "combine_wait_recv_cost_stats",
    ],
    "clean_low_latency_buffer": ["self", "num_max_dispatch_tokens_per_rank", "hidden", "num_experts"],
    "get_next_low_latency_combine_buffer": ["self", "handle"],
    "get_low_latency_rdma_size_hint": ["num_max_dispatch_tokens_per_rank", "hidden", "num_ranks", "num_experts"],
    "get_dispatch_config": ["num_ranks"],
    "get_combine_config": ["num_ranks"],
    "get_local_buffer_tensor": ["self", "dtype", "size", "offset", "use_rdma_buffer"],
    "get_comm_stream": ["self"],
    "destroy": ["self"],
    "capture": [],
    "is_sm90_compiled": [],
}


@pytest.mark.parametrize("method", sorted(DEEPEP_SIGNATURES))
def test_signature_matches_deepep(method: str) -> None:
    params = list(inspect.signature(getattr(Buffer, method)).parameters)
    expected = DEEPEP_SIGNATURES[method]
    assert params[: len(expected)] == expected, f"{method}: {params}"
    # Anything beyond DeepEP's parameters is keyword-only or defaulted, so DeepEP calls still bind.
    for name in params[len(expected) :]:
        assert inspect.signature(getattr(Buffer, method)).parameters[name].default is not inspect.Parameter.empty


def test_public_names() -> None:
    for name in [
        "Buffer",
        "Config",
        "EventOverlap",
        "EventHandle",
        "topk_idx_t",
        "list_backends",
        "BackendUnavailableError",
        "UnsupportedFeatureError",
        "CollectiveMismatchError",
        "CommTimeoutError",
    ]:
        assert hasattr(deep_ep, name), name
    assert deep_ep.topk_idx_t == torch.int64
    assert issubclass(deep_ep.UnsupportedFeatureError, NotImplementedError)
    from deep_ep.utils import EventHandle as Handle  # Megatron's import path
    from deep_ep.utils import EventOverlap as Overlap

    assert Handle is EventHandle and Overlap is EventOverlap
    assert "reference" in deep_ep.list_backends()


def test_static_helpers() -> None:
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 288) == 2146961792
    assert (
        Buffer.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank=128, hidden=7168, num_ranks=8, num_experts=288
        )
        == 2146961792
    )
    assert Buffer.num_sms == 20
    for r in [1, 2, 3, 4, 5, 8, 16, 24, 32, 48, 64, 96, 100, 128, 144, 160, 200]:
        for cfg in (Buffer.get_dispatch_config(r), Buffer.get_combine_config(r)):
            assert isinstance(cfg, Config) and cfg.num_sms == 20
    assert Buffer.get_dispatch_config(8) == Config(20, 6, 256, 6, 128)
    try:
        Buffer.set_num_sms(24)
        assert Buffer.num_sms == 24 and Buffer.get_dispatch_config(8).num_sms == 24
        with pytest.raises(ValueError, match="even"):
            Buffer.set_num_sms(23)
    finally:
        Buffer.set_num_sms(20)
    assert Buffer.is_sm90_compiled() is True  # fp8 dispatch is there: DeepEP's tests gate it on this
    event = Buffer.capture()
    assert isinstance(event, EventOverlap)
    event.current_stream_wait()
    with Buffer.capture():
        pass


def _buffer_basics(rank: int, world: int) -> None:
    group = dist.group.WORLD
    buffer = Buffer(group, 1 << 20, 0, explicitly_destroy=True)
    assert (buffer.rank, buffer.group_size, buffer.group) == (rank, world, group)
    assert (buffer.num_nvl_bytes, buffer.num_rdma_bytes, buffer.low_latency_mode) == (1 << 20, 0, False)
    assert buffer.backend == "reference" and buffer.low_latency_quant == "fp8"
    assert buffer.explicitly_destroy and buffer.get_comm_stream() is None
    view = buffer.get_local_buffer_tensor(torch.bfloat16, (16, 8), offset=64)
    assert view.shape == (16, 8) and view.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="offset"):
        buffer.get_local_buffer_tensor(torch.int32, offset=3)
    odd = Buffer(group, 10)  # as DeepEP, a last partial element is left out of the view
    assert odd.get_local_buffer_tensor(torch.float32).numel() == 2
    assert odd.get_local_buffer_tensor(torch.float32, offset=4).numel() == 1
    assert buffer.enable_shrink is False and not hasattr(buffer, "nvshmem_qp_depth")
    assert Buffer(group, low_latency_mode=True).nvshmem_qp_depth == 1024
    for internal in (buffer.internode_dispatch, buffer.internode_combine):
        with pytest.raises(deep_ep.UnsupportedFeatureError, match="call (dispatch|combine)"):
            internal(torch.zeros(1, 1))
    assert check_nvlink_connections(group) is None  # a gloo group: no GPU pair to check
    with pytest.raises(deep_ep.UnsupportedFeatureError, match="enable_shrink"):
        Buffer(group, enable_shrink=True)
    with pytest.raises(deep_ep.UnsupportedFeatureError, match="mpi4py"):
        Buffer(group, comm=object())
    with pytest.raises(ValueError, match="low_latency_quant"):
        Buffer(group, low_latency_quant="fp4")
    with pytest.raises(deep_ep.UnsupportedFeatureError, match="enable_shrink"):
        buffer.low_latency_clean_mask_buffer()
    assert Buffer(group, low_latency_quant="int8").low_latency_quant == "int8"
    with pytest.raises(ValueError, match="explicitly_destroy"):
        Buffer(group).destroy()
    buffer.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.get_dispatch_layout(torch.zeros(1, 1, dtype=torch.long), world)
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.get_comm_stream()
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.comm_timeout = 5.0


def test_buffer_attributes_and_lifetime() -> None:
    run_ranks(2, _buffer_basics)


class _Unavailable(base.Backend):
    name = "test-unavailable"
    device_types = ("cpu",)

    @classmethod
    def unavailable_reason(cls, group, device):
        return "needs the frobnicator (test backend)"


class _BrokenProbe(base.Backend):
    name = "test-broken-probe"
    device_types = ("cpu",)
    priority = 100

    @classmethod
    def unavailable_reason(cls, group, device):
        raise RuntimeError("probe exploded")


def _registry_checks(rank: int, world: int) -> None:
    group = dist.group.WORLD
    with pytest.raises(ValueError, match="registered backends: .*reference"):
        Buffer(group, backend="no-such-backend")
    for reserved in ("auto", ""):
        with pytest.raises(ValueError, match="reserved or empty"):
            register_backend(reserved, _Unavailable)
    register_backend("test-unavailable", _Unavailable)
    # A probe that raises, a path that does not import, a backend for other devices: each is reported as
    # unavailable with its reason, and none of them breaks "auto".
    register_backend("test-broken-probe", _BrokenProbe)
    register_backend("test-missing-module", "no_such_module_for_deep_ep:Backend")
    register_backend("test-npu-only", type("NpuOnly", (_Unavailable,), {"device_types": ("npu",)}))
    try:
        reasons = availability(group, torch.device("cpu"))
        assert reasons["reference"] is None
        assert "probe exploded" in reasons["test-broken-probe"]
        assert "could not be imported" in reasons["test-missing-module"]
        assert reasons["test-npu-only"] == "backend 'test-npu-only' serves devices ['npu'], not 'cpu'"
        with pytest.raises(deep_ep.BackendUnavailableError, match="could not be imported"):
            Buffer(group, backend="test-missing-module")
        with pytest.raises(deep_ep.BackendUnavailableError, match="frobnicator"):
            Buffer(group, backend="test-unavailable")
        # "auto" skips it; an available backend of higher priority wins over reference.
        assert Buffer(group).backend == "reference"
        cls = get_backend_class("reference")
        preferred = type("Preferred", (cls,), {"name": "test-preferred", "priority": 10})
        register_backend("test-preferred", preferred)
        assert Buffer(group).backend == "test-preferred"
        assert Buffer(group, backend="reference").backend == "reference"  # explicit never falls back
    finally:
        for name in ("test-unavailable", "test-preferred", "test-broken-probe", "test-missing-module", "test-npu-only"):
            unregister_backend(name)
    # Unregistering a built-in name restores the built-in.
    register_backend("reference", _Unavailable)
    unregister_backend("reference")
    assert select_backend("auto", group, torch.device("cpu")).name == "reference"


def test_registry() -> None:
    run_ranks(1, _registry_checks)


def _env_backend(rank: int, world: int) -> str:
    return Buffer(dist.group.WORLD).backend


def test_env_variable_names_the_backend() -> None:
    with pytest.raises(AssertionError, match="registered backends"):
        run_ranks(1, _env_backend, env={"DEEP_EP_BACKEND": "nonexistent"})
    assert run_ranks(1, _env_backend, env={"DEEP_EP_BACKEND": "reference"}) == ["reference"]


def test_entry_point_backend(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "ep_plugin_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent("""
        from deep_ep.backends.reference import ReferenceBackend
        class PluginBackend(ReferenceBackend):
            name = "plugin"
    """)
    )
    info = tmp_path / "ep_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[deep_ep.backends]\nplugin = ep_plugin_pkg:PluginBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import deep_ep.backends as registry

    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert "plugin" in registry.list_backends()
        assert registry.get_backend_class("plugin").name == "plugin"
    finally:
        unregister_backend("plugin")
        sys.modules.pop("ep_plugin_pkg", None)


def _async_round(rank: int, world: int) -> None:
    w = make_workload(world, 9, 16, 2, 4 * world, seed=3)
    buffer = Buffer(dist.group.WORLD)
    layout = buffer.get_dispatch_layout(w.topk_idx[rank], w.num_experts)
    kwargs = dict(
        num_tokens_per_rank=layout[0],
        is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2],
        topk_idx=w.topk_idx[rank],
        topk_weights=w.topk_weights[rank],
    )
    sync = buffer.dispatch(w.x[rank], **kwargs)
    out = buffer.dispatch(w.x[rank], async_finish=True, **kwargs)
    event = out[-1]
    # On the CPU the all-to-all is in flight and the unpacking waits for current_stream_wait().
    assert not event.event.is_complete
    event.current_stream_wait()
    assert event.event.is_complete
    for i in range(4):
        assert_bit_equal(f"output {i}", out[i], sync[i])
    combined_sync, _, _ = buffer.combine(sync[0], sync[4])
    with buffer.combine(out[0], out[4], async_finish=True, previous_event=event, allocate_on_comm_stream=True)[
        2
    ] as pending:
        pass  # work overlapped here
    del pending
    combined, _, event = buffer.combine(out[0], out[4], async_finish=True)
    event.current_stream_wait()
    assert_bit_equal("combined", combined, combined_sync)
    with pytest.raises(ValueError, match="allocate_on_comm_stream"):
        buffer.combine(out[0], out[4], allocate_on_comm_stream=True)
    with pytest.raises(TypeError, match="previous_event"):
        buffer.combine(out[0], out[4], previous_event="not an event")


def _copied_handles(rank: int, world: int) -> None:
    w = make_workload(world, 9, 16, 2, 4 * world, seed=5)
    buffer = Buffer(dist.group.WORLD)
    layout = buffer.get_dispatch_layout(w.topk_idx[rank], w.num_experts)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        w.x[rank],
        num_tokens_per_rank=layout[0],
        is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2],
        topk_idx=w.topk_idx[rank],
        topk_weights=w.topk_weights[rank],
    )
    want = buffer.combine(recv_x, handle)[0]
    assert copy.copy(handle) is handle
    twin = copy.deepcopy(handle)  # DeepEP's handle is a tuple: user code may copy it
    assert type(twin) is type(handle) and twin is not handle and twin[0] is not handle[0]
    for i in range(6):
        assert_bit_equal(f"handle[{i}]", twin[i], handle[i])
    assert_bit_equal("cached dispatch with the copy", buffer.dispatch(w.x[rank], handle=twin)[0], recv_x)
    assert_bit_equal("combine with the copy", buffer.combine(recv_x, twin)[0], want)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(handle)
    ll = Buffer(dist.group.WORLD, low_latency_mode=True)
    ll_handle = ll.low_latency_dispatch(w.x[rank], w.topk_idx[rank], 16, w.num_experts, use_fp8=False)[2]
    assert copy.deepcopy(ll_handle).num_topk == ll_handle.num_topk


def test_handles_copy_like_deepep_tuples() -> None:
    run_ranks(2, _copied_handles)


def test_async_finish_defers_and_matches_sync() -> None:
    run_ranks(2, _async_round)


class _UnpackFails(ReferenceBackend):
    """The reference backend whose normal dispatch of 3 tokens fails after its transfer: a failing completion."""

    name = "test-unpack-fails"

    def dispatch(self, args):
        out, route, pending = super().dispatch(args)
        if args.x.shape[0] == 3:

            def fail() -> None:
                raise RuntimeError("the unpacking failed")

            pending = pending.then(fail)
        return out, route, pending


def _failed_async_dispatch(rank: int, world: int) -> None:
    register_backend("test-unpack-fails", _UnpackFails)
    buffer = Buffer(dist.group.WORLD, backend="test-unpack-fails")
    x, idx = torch.ones(3, 16, dtype=torch.bfloat16), torch.zeros(3, 1, dtype=torch.long)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 2 * world)
    event = buffer.dispatch(x, None, per_rank, None, in_rank, per_expert, async_finish=True)[-1]
    with pytest.raises(RuntimeError, match="the unpacking failed"):
        event.current_stream_wait()
    # Waited on again: it raises again instead of returning as if the outputs had been filled.
    with pytest.raises(RuntimeError, match="this receive failed earlier"):
        event.current_stream_wait()
    assert not event.event.is_complete
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx[:2], 2 * world)
    recv_x = buffer.dispatch(x[:2], None, per_rank, None, in_rank, per_expert)[0]  # the Buffer is still usable
    assert recv_x.shape[0] == 2 * world * (rank == 0)


def test_a_failed_async_completion_raises_at_every_wait() -> None:
    run_ranks(2, _failed_async_dispatch)


def _issued_in_inference_mode(rank: int, world: int) -> None:
    w = make_workload(world, 9, 16, 2, 4 * world, seed=7)
    x, idx, weights = w.x[rank], w.topk_idx[rank], w.topk_weights[rank]
    buffer, ll = Buffer(dist.group.WORLD), Buffer(dist.group.WORLD, low_latency_mode=True)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, w.num_experts)
    kwargs = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    sync = buffer.dispatch(x, topk_idx=idx, topk_weights=weights, **kwargs)
    ll_sync = ll.low_latency_dispatch(x, idx, 16, w.num_experts, use_fp8=False)
    # Issued inside inference mode (outputs are inference tensors), completed outside it: as on a GPU, it works.
    with torch.inference_mode():
        out = buffer.dispatch(x, topk_idx=idx, topk_weights=weights, async_finish=True, **kwargs)
    out[-1].current_stream_wait()
    for i in range(3):
        assert_bit_equal(f"dispatch output {i}", out[i], sync[i])
    with torch.inference_mode():
        combined, _, event = buffer.combine(sync[0], sync[4], async_finish=True)
    event.current_stream_wait()
    assert_bit_equal("combine", combined, buffer.combine(sync[0], sync[4])[0])
    with torch.inference_mode():
        recv_x, count, _, _, hook = ll.low_latency_dispatch(
            x, idx, 16, w.num_experts, use_fp8=False, return_recv_hook=True
        )
    hook()
    assert torch.equal(count, ll_sync[1])
    for expert, n in enumerate(count.tolist()):  # rows past the count are not defined
        assert_bit_equal(f"low-latency recv_x of expert {expert}", recv_x[expert, :n], ll_sync[0][expert, :n])


def test_an_async_call_issued_in_inference_mode_completes_outside_it() -> None:
    run_ranks(2, _issued_in_inference_mode)


def _seed_code(rank: int, world: int) -> None:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import seed_user_code as user

    w = make_workload(world, 10, 32, 3, 4 * world, seed=21)
    x, idx, weights = w.x[rank], w.topk_idx[rank], w.topk_weights[rank]
    buffer = user.get_buffer(dist.group.WORLD, user.get_hidden_bytes(x))
    assert user.get_buffer(dist.group.WORLD, user.get_hidden_bytes(x)) is buffer  # reused
    recv_x, recv_idx, recv_w, counts, handle, event = user.dispatch_forward(x, idx, weights, w.num_experts)
    event.current_stream_wait()
    lay = reference.layout(w.topk_idx, w.num_experts)
    spec = reference.dispatch(
        w.x,
        [q["is_token_in_rank"] for q in lay],
        [q["num_tokens_per_expert"] for q in lay],
        w.topk_idx,
        w.topk_weights,
        w.num_experts,
    )
    assert_bit_equal("recv_x", recv_x, spec[rank]["recv_x"])
    assert counts == spec[rank]["num_recv_tokens_per_expert_list"]
    combined, event = user.combine_forward(recv_x, handle, previous_event=event)
    event.current_stream_wait()
    grad_x, event = user.combine_backward(combined, handle)
    event.current_stream_wait()
    grad, grad_w, event = user.dispatch_backward(grad_x, recv_w, handle)
    event.current_stream_wait()
    # combine(dispatch(x)) = x * (number of destination ranks), exactly in bf16 for small counts.
    fanout = lay[rank]["is_token_in_rank"].sum(1, keepdim=True)
    assert_bit_equal("combine_forward", combined, (x.float() * fanout).to(torch.bfloat16))
    assert_bit_equal("dispatch_backward weights", grad_w, weights)


def test_seed_user_code_runs_unchanged() -> None:
    run_ranks(2, _seed_code)
    run_ranks(3, _seed_code)
