"""The Ascend backend against the reference backend, on an EMULATION of torch_npu's fused MoE ops.

No NPU and no CANN toolkit exist here: every multi-rank test installs `deep_ep.testing.npu_emulation` (a
fake `torch_npu` running the documented op semantics over gloo) inside its rank processes. A pass shows
the backend drives the documented API correctly and turns the documented outputs into the SPEC layout;
it does not show what an NPU does. Comparisons follow SPEC section 9.
"""

from __future__ import annotations

import pytest
import torch
from ascend_ranks import (
    availability,
    changing_shape,
    differential,
    empty_tokens,
    fallback,
    hierarchy,
    lazy_import,
    meta_shapes,
    no_emulation,
    op_errors,
    record_calls,
    small_buffsize,
    strict,
    uneven_buffsize,
)

from deep_ep.backends import ascend
from deep_ep.testing import RankFailure, run_ranks
from deep_ep.testing.npu_emulation.schemas import SCHEMAS


# ---- ascend (EMULATED) against reference, SPEC 9 rules (tests/ascend_ranks.py) ----------------------
@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("chip,hidden", [("A3", 1024), ("A2", 64)])
def test_emulated_ascend_matches_reference(world: int, chip: str, hidden: int) -> None:
    """EMULATION: fused low-latency path (A3 limits; A2 limits with the group-size minimum relaxed) and the
    normal mode, against the reference backend at 2, 4 and 8 ranks."""
    results = run_ranks(world, differential, chip, hidden)
    for result in results:
        assert result["ops"] == ["npu_moe_distribute_combine_v2", "npu_moe_distribute_dispatch_v2"]
        assert result["fallbacks"] == []


def test_a3_token_selecting_nothing_combines_to_zero() -> None:
    """EMULATION: the A3 combine op writes only the tokens its 2-D x_active_mask activates (ops-transformer
    moe_distribute_combine_v2.h, LocalWindowCopy) into an uninitialised output; the backend must give +0.0."""
    for out in run_ranks(2, empty_tokens):
        assert out[1] == [0.0] * 1024
        assert not any(v != v for row in out for v in row), "NaN: a row the op never wrote leaked out"


@pytest.mark.parametrize("chip,world,hidden", [("A2", 4, 64), ("A3", 8, 7168)])
def test_emulated_v1_ops_when_v2_is_missing(chip: str, world: int, hidden: int) -> None:
    """EMULATION of a torch_npu without the v2 ops: the backend uses npu_moe_distribute_dispatch/combine."""
    results = run_ranks(world, differential, chip, hidden, ("v1",))
    assert results[0]["ops"] == ["npu_moe_distribute_combine", "npu_moe_distribute_dispatch"]
    assert results[0]["fallbacks"] == []


@pytest.mark.parametrize("chip,hidden", [("A2", 64), ("A3", 64)])
def test_outside_the_support_matrix_runs_the_reference_algorithm(chip: str, hidden: int) -> None:
    """A2 below 16 ranks and A3 below hidden=1024 fall back to the reference algorithm, logged once."""
    results = run_ranks(2, fallback, chip, hidden)
    limit = "group size 2" if chip == "A2" else "hidden=64"
    for result in results:
        assert result["ops"] == 0
        assert len(result["logged"]) == 1 and limit in result["logged"][0], result["logged"]


@pytest.mark.parametrize("generation", ["v1", "v2"])
def test_a2_hierarchy_variables(generation: str) -> None:
    """EMULATION: HCCL_INTRA_PCIE_ENABLE=1 with HCCL_INTRA_ROCE_ENABLE=0 selects A2's 'hierarchy' algorithm where an
    op is not given comm_alg; its combine weights rows by their dispatch-time scales, so the v1 ops (no comm_alg
    keyword) must not be used then. The v2 ops are told comm_alg='fullmesh' and stay fused."""
    env = {"HCCL_INTRA_PCIE_ENABLE": "1", "HCCL_INTRA_ROCE_ENABLE": "0"}
    results = run_ranks(4, hierarchy, generation, env=env)
    for result in results:
        if generation == "v1":
            assert result["ops"] == [] and len(result["logged"]) == 1 and "hierarchy" in result["logged"][0]
        else:
            assert result["ops"] == ["npu_moe_distribute_combine_v2", "npu_moe_distribute_dispatch_v2"]
            assert result["logged"] == []


def test_calls_that_change_global_bs_or_expert_count_run_the_reference_algorithm() -> None:
    """The op docs fix global_bs and moe_expert_num for every call (layer) on one communicator: calls with another
    T or E than the first fused call's run the reference algorithm (logged once per shape), bit-identical."""
    for result in run_ranks(2, changing_shape):
        assert result["ops"] == 4  # dispatch + combine of the two calls with the first shape
        assert len(result["logged"]) == 2 and all("first fused call's (4, 4)" in m for m in result["logged"])


def test_strict_mode_raises_naming_the_limit() -> None:
    messages = run_ranks(2, strict, env={ascend.FALLBACK_ENV: "raise"})
    assert "{16, 32, 64, 128, 256}" in messages[0]


def test_hccl_buffsize_is_checked_against_the_documented_formula() -> None:
    messages = run_ranks(2, small_buffsize, env={"HCCL_BUFFSIZE": "1"})
    assert all("Set HCCL_BUFFSIZE=2" in m for m in messages)


def test_hccl_buffsize_must_agree_across_ranks() -> None:
    """The op docs require one HCCL_BUFFSIZE on every rank; a rank that raised alone would hang the others."""
    messages = run_ranks(2, uneven_buffsize, timeout=60)
    assert all("[300, 301] MB by rank" in m for m in messages)


# ---- the ops as the backend calls them: schema keywords, meta shapes, argument checks -------------------
def test_every_keyword_the_backend_passes_is_in_the_torch_npu_2_14_0_schema() -> None:
    calls = run_ranks(2, record_calls)[0]
    assert {name for _, name, _, _ in calls} == set(SCHEMAS)
    for chip, name, positional, kinds in calls:
        assert positional == 0, f"{name}: the backend passes arguments by keyword only"
        schema = {a.name: a for a in torch._C.parse_schema(SCHEMAS[name]).arguments}
        required = {n for n, a in schema.items() if not a.has_default_value()}
        assert required <= set(kinds), f"{name}: missing {required - set(kinds)}"
        for key, kind in kinds.items():
            assert key in schema, f"{chip} {name}: keyword {key!r} is not in the torch-npu 2.14.0 schema"
            declared = str(schema[key].type).removeprefix("Optional[").removesuffix("]").rstrip("?")
            assert kind == declared, f"{chip} {name}: {key} is {kind}, the schema says {schema[key].type}"


def test_emulated_output_shapes_follow_the_2_14_0_meta_functions() -> None:
    """Shapes worked out by hand from torch-npu 2.14.0's meta functions (A = global_bs * min(L, K))."""
    got = run_ranks(2, meta_shapes)[0]
    i32, f32, i64 = "torch.int32", "torch.float32", "torch.int64"
    assert got[("A3", "v2")] == [
        ((16, 1024), "torch.int8"), ((16,), f32), ((2048,), i32), ((2,), i64), ((4,), i32), ((0,), i32), ((0,), f32)
    ]  # fmt: skip
    assert got[("A2", "v2")] == [
        ((18, 64), "torch.bfloat16"), ((18,), f32), ((2304,), i32), ((4,), i64), ((8,), i32), ((0,), i32), ((18,), f32)
    ]  # fmt: skip
    assert got[("A2", "v1")][2] == ((9,), i32)  # v1: expand_idx [BS * K]


def test_emulated_ops_apply_the_documented_argument_checks() -> None:
    errors = run_ranks(2, op_errors)[0]
    assert "distinct" in errors[0] and "int32" in errors[1] and "expert_scales" in errors[2]
    assert "true must come before" in errors[3] and "quant_mode" in errors[4]
    assert all(e.startswith("[EMULATION of torch_npu]") for e in errors)


# ---- availability, selection, laziness -------------------------------------------------------------------
def test_unavailable_without_torch_npu_and_import_stays_lazy() -> None:
    """In a process that never installed the emulation: no torch_npu is imported, and the reason says why."""
    assert run_ranks(1, lazy_import)[0] == "torch_npu is not installed (No module named 'torch_npu')"


def test_backend_selection_and_reasons() -> None:
    out = run_ranks(1, availability)[0]
    assert out["auto_without"] == "reference" and out["auto_with"] == "ascend"
    assert out["gloo"] == "the group's backend is 'gloo'; the fused ops need an HCCL group"
    assert "neither Atlas A2" in out["chip"]


# ---- pure functions ------------------------------------------------------------------------------------------
def test_chip_names() -> None:
    assert ascend.classify_chip("Ascend910B3") == "A2" and ascend.classify_chip("Ascend910B4_1") == "A2"
    assert ascend.classify_chip("Ascend910_9392") == "A3" and ascend.classify_chip("Ascend910_9362") == "A3"
    assert ascend.classify_chip("Ascend910A") is None and ascend.classify_chip("Ascend310P3") is None


def test_support_matrix_reasons() -> None:
    a2, a3 = ascend.SUPPORT_MATRIX[("A2", "v2")], ascend.SUPPORT_MATRIX[("A3", "v2")]
    assert ascend.unsupported_reason(a2, 16, 256, 7168, 8, 256) is None
    assert "hidden=7200" in ascend.unsupported_reason(a2, 16, 8, 7200, 8, 256)
    assert "multiple of 32" in ascend.unsupported_reason(a2, 16, 8, 100, 8, 256)
    assert "limit of 256 tokens" in ascend.unsupported_reason(a2, 16, 257, 7168, 8, 256)
    assert "24" in ascend.unsupported_reason(a2, 16, 8, 7168, 8, 512)
    assert ascend.unsupported_reason(a3, 768, 512, 7168, 16, 768) is None
    assert "group size 769" in ascend.unsupported_reason(a3, 769, 8, 7168, 8, 769)
    assert "limit of 16" in ascend.unsupported_reason(a3, 8, 8, 7168, 17, 256)
    assert "limit of 1024" in ascend.unsupported_reason(a3, 8, 8, 7168, 8, 2048)
    assert "num_topk=9 exceeds num_experts=8" in ascend.unsupported_reason(a3, 2, 8, 7168, 9, 8)
    assert "need 0 < K" in ascend.unsupported_reason(a2, 16, 8, 7168, 0, 256)  # no selections: the reference


def test_hccl_buffsize_is_read_as_cann_reads_it(monkeypatch) -> None:
    monkeypatch.setenv("HCCL_BUFFSIZE", "300")
    assert ascend.hccl_buffsize_mb() == 300
    monkeypatch.setenv("HCCL_BUFFSIZE", "200MB")
    with pytest.raises(ValueError, match="HCCL_BUFFSIZE='200MB' must be an integer number of MB"):
        ascend.hccl_buffsize_mb()


def test_hccl_buffsize_formulas_by_hand() -> None:
    a2, a3 = ascend.SUPPORT_MATRIX[("A2", "v2")], ascend.SUPPORT_MATRIX[("A3", "v2")]
    # A2: 2 * (BS * R * min(L, K) * H * 2 + 2 MB) = 2 * (128 * 16 * 8 * 7168 * 2 + 2 MB) = 452 MB.
    assert ascend.required_hccl_buffsize_mb(a2, 16, 128, 7168, 8, 256) == 452
    # A3: 2 * (L*BS*R*Align512(Align32(2H)+64) + K*BS*Align512(2H)) = 2 * (16*128*16*14848 + 8*128*14336)
    # = 1002438656 bytes -> 956 MB.
    assert ascend.required_hccl_buffsize_mb(a3, 16, 128, 7168, 8, 256) == 956
    # A3 v1: 2 + ceil(2 * BS * 2 * (H + 128) * (R * L + K + 1) / 1 MB) with BS=8, H=7168, R=16, L=16, K=8.
    assert ascend.required_hccl_buffsize_mb(ascend.SUPPORT_MATRIX[("A3", "v1")], 16, 8, 7168, 8, 256) == 2 + 60


def test_substitute_ids_are_distinct_valid_and_local_first() -> None:
    ids = torch.tensor(
        [[[0, -1, -1], [-2, -2, -2]], [[5, -1, 4], [-1, -1, -1]]], dtype=torch.int32
    )  # R=2, T=2, K=3, E=6, L=3
    out = ascend.substitute_ids(ids, 6, 3)
    assert out.tolist() == [[[0, 1, 2], [0, 1, 2]], [[5, 3, 4], [3, 4, 5]]]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.stack([torch.randperm(16, generator=gen)[:5] for _ in range(12)]).view(3, 4, 5).int()
        ids = torch.where(torch.rand(ids.shape, generator=gen) < 0.5, -1, ids)
        out = ascend.substitute_ids(ids, 16, 4)
        assert bool(((out >= 0) & (out < 16)).all())
        assert torch.equal(torch.where(ids >= 0, out, ids), ids)
        ordered = out.sort(-1).values
        assert not bool((ordered[..., 1:] == ordered[..., :-1]).any())


def test_spec_layout_by_hand() -> None:
    # R=2, T=2, K=2, L=2, this rank 1 (experts 2, 3). Source 0: t0 -> (2, 1), t1 -> (3, 0); source 1:
    # t0 -> (2, 3), t1 -> (0, 1). Entry (s1, t0, k1) = expert 3 is a substitute (not real) on an A2-style call.
    ids = torch.tensor([[[2, 1], [3, 0]], [[2, 3], [0, 1]]], dtype=torch.int32)
    real = torch.ones(2, 2, 2, dtype=torch.bool)
    real[1, 0, 1] = False
    sent = torch.ones_like(real)
    layout = ascend.spec_layout(sent, real, ids, rank=1, experts_per_rank=2, capacity=8)
    # Op rows: expert 2: (s0, t0), (s1, t0); expert 3: (s0, t1), (s1, t0 substitute) -> packed 0..3.
    assert layout.recv_count.tolist() == [2, 1]
    assert layout.pack_row.view(2, 4).tolist() == [[0, 1, 8, 8], [2, 8, 8, 8]]
    assert layout.src_info.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0]]
    assert layout.layout_range.tolist() == [[(0 << 32) | 1, (1 << 32) | 1], [(0 << 32) | 1, (1 << 32) | 0]]


def test_emulation_must_be_installed_to_be_used() -> None:
    with pytest.raises(RankFailure):
        run_ranks(1, no_emulation, timeout=60)
