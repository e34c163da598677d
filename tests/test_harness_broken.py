"""The harness catches bugs: deliberately broken backends (test_harness_mutants.py, subclasses of the reference
backend registered in every rank by the plan's setup function) must be reported with the right op, tensor,
rank and index, and a correct backend with another low-latency row order must pass when it says so.

All mutants run in one 4-rank world (one plan, one participant each, compared with the spec): a world costs
more than the cases in it."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from test_harness_mutants import register_broken_backends

import reference
from deep_ep.testing import diff

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import crosscheck  # noqa: E402

WORLD = 4


def _case(mode: str, dtype: str = "bf16", family: str = "uniform", **kwargs) -> diff.Case:
    fields = dict(num_tokens=12, max_tokens=12, hidden=64, num_topk=3, experts_per_rank=2, seed=7, bias=2)
    fields.update(kwargs)
    fields["max_tokens"] = max(fields["max_tokens"], fields["num_tokens"])
    return diff.Case(mode=mode, dtype=dtype, family=family, **fields)


CASES = {
    "normal": _case("normal"),
    "ll_bf16": _case("low_latency", num_tokens=10, seed=3),
    "ll_fp8": _case("low_latency", "fp8", num_tokens=10, hidden=128, seed=3),
    # Every token on all four ranks (L = 1, K = 4), no bias: fp32 weight sums of three or more terms.
    "reduction": _case("normal", num_tokens=16, hidden=16, num_topk=4, experts_per_rank=1, seed=11, bias=0),
    "sparse": _case("normal", family="sparse", num_tokens=10),
    "ll_int8": _case("low_latency", "int8", num_tokens=8, hidden=32, seed=5),
    "normal_fp8": _case("normal", "fp8", seed=9),  # (e4m3, scales) tuples
}
CASE_INDEX = {name: i for i, name in enumerate(CASES)}
MUTANTS = [
    "broken_flipped_bit",
    "broken_swapped_rows",
    "reordered_rows",
    "reordered_rows_claiming_spec_order",
    "reordered_rows_claiming_spec_order:any-order",
    "broken_reduction_order",
    "broken_recv_count",
    "broken_expert_list",
    "broken_minus_one",
    "int8_off_by_one",
    "int8_off_by_two",
    "broken_abs_weights",
    "broken_abs_weights_ll",
    "broken_cached_scales",
    "broken_ignores_worst",
    "broken_no_topk_counts",
    "broken_tensor_counts",
]


@pytest.fixture(scope="module")
def report() -> diff.Report:
    participants = [diff.Participant.parse(p) for p in ["spec", *MUTANTS]]
    plan = diff.Plan(participants, list(CASES.values()), max_records=8, comm_timeout=60)
    return diff.run_local(WORLD, plan, setup=register_broken_backends, timeout=300)


def _label(mutant: str) -> str:
    return diff.Participant.parse(mutant).resolve("gloo").label


def _checks(report: diff.Report, mutant: str, case: str) -> list[dict]:
    label, index = _label(mutant), CASE_INDEX[case]
    return [c for c in report.checks if c["participant"] == label and c["case_index"] == index]


def _failing(report: diff.Report, mutant: str, case: str) -> set[tuple[str, str, int]]:
    return {(c["op"], c["tensor"], c["rank"]) for c in _checks(report, mutant, case) if not c["passed"]}


def _mismatches(report: diff.Report, mutant: str, case: str, op: str | None = None, tensor: str | None = None):
    label, index = _label(mutant), CASE_INDEX[case]
    return [
        m
        for m in report.mismatches()
        if m["participant"] == label
        and m["case_index"] == index
        and (op is None or m["op"] == op)
        and (tensor is None or m["tensor"] == tensor)
    ]


def test_every_mutant_ran_and_the_report_fails(report: diff.Report) -> None:
    assert not report.errors, report.format()
    assert not report.ok and report.exit_status == 1
    assert "RESULT: FAIL" in report.format()


def test_flipped_bit_is_reported_with_its_index(report: diff.Report) -> None:
    first = _mismatches(report, "broken_flipped_bit", "normal")[0]
    assert (first["op"], first["tensor"], first["rank"], first["index"]) == ("dispatch", "recv_x", 1, [2, 3])
    assert int(first["expected_bits"], 16) ^ int(first["actual_bits"], 16) == 1
    dispatch = [c for c in _checks(report, "broken_flipped_bit", "normal") if c["op"] == "dispatch" and not c["passed"]]
    assert [(c["tensor"], c["rank"], c["failing"]) for c in dispatch] == [("recv_x", 1, 1)]
    assert "rank 1 dispatch.recv_x[2, 3]: expected" in report.format(max_mismatches=10_000)


def test_swapped_rows_are_reported_at_both_rows(report: diff.Report) -> None:
    src = _mismatches(report, "broken_swapped_rows", "ll_bf16", "low_latency_dispatch", "src_info")
    assert [m["rank"] for m in src] == [0, 0]
    (i0, j0), (i1, j1) = src[0]["index"], src[1]["index"]
    assert i0 == i1 == 0 and j1 == j0 + 1
    assert (src[0]["expected"], src[0]["actual"]) == (src[1]["actual"], src[1]["expected"])
    rows = {tuple(m["index"][:2]) for m in _mismatches(report, "broken_swapped_rows", "ll_bf16", tensor="recv_x")}
    assert rows and rows <= {(0, j0), (0, j1)}
    failing = _failing(report, "broken_swapped_rows", "ll_bf16")
    assert ("low_latency_dispatch", "recv_count", 0) not in failing
    assert ("low_latency_combine", "combined_x", 0) in failing  # combine reads the rows by the old route


def test_another_row_order_passes_in_canonical_order_only_when_declared(report: diff.Report) -> None:
    orders = report.rank_results[0]["row_order"]
    assert orders[_label("reordered_rows")] == "any"
    assert orders[_label("reordered_rows_claiming_spec_order")] == "spec"
    assert orders[_label("reordered_rows_claiming_spec_order:any-order")] == "any"
    assert "canonical low-latency row order for: reordered_rows@cpu" in report.format()
    for case in ("ll_bf16", "ll_fp8", "ll_int8"):
        # Declared by the backend's feature, or by the participant's option: rows compared in canonical order.
        for mutant in ("reordered_rows", "reordered_rows_claiming_spec_order:any-order"):
            checks = _checks(report, mutant, case)
            assert checks and all(c["passed"] for c in checks), (mutant, case)
        # Claiming SPEC 6 order, the same rows are a mismatch, at expert 0 of rank 0; combine is right.
        failing = _failing(report, "reordered_rows_claiming_spec_order", case)
        assert ("low_latency_dispatch", "src_info", 0) in failing, case
        assert not any(op == "low_latency_combine" for op, _, _ in failing)
        src = _mismatches(report, "reordered_rows_claiming_spec_order", case, tensor="src_info")
        assert all(m["index"][0] == 0 for m in src)


def test_wrong_reduction_order_is_reported_with_the_values_of_both_orders(report: diff.Report) -> None:
    # bf16 rows summed in fp32 rarely round differently in another order; the fp32 weight sums do.
    failing = _failing(report, "broken_reduction_order", "reduction")
    assert failing and {op for op, _, _ in failing} <= {"combine", "combine_backward"}, failing
    records = _mismatches(report, "broken_reduction_order", "reduction", "combine_backward", "combined_topk_weights")
    assert records
    # Recompute each reported element independently: destinations ascending give `expected`, descending `actual`.
    inputs = diff.build_inputs(CASES["reduction"], WORLD)
    w = inputs.workload
    layouts = reference.layout(w.topk_idx, w.num_experts)
    in_rank = [lay["is_token_in_rank"] for lay in layouts]
    per_expert = [lay["num_tokens_per_expert"] for lay in layouts]
    sent = reference.dispatch(inputs.x, in_rank, per_expert, w.topk_idx, w.topk_weights, w.num_experts)

    def total(terms) -> float:
        acc = torch.zeros((), dtype=torch.float32)
        for term in terms:
            acc = acc + term
        return float(acc)

    for record in records:
        rank, (t, k) = record["rank"], record["index"]
        terms = []
        for d in range(WORLD):
            if in_rank[rank][t, d]:
                row = sum(int(in_rank[s][:, d].sum()) for s in range(rank)) + int(in_rank[rank][:t, d].sum())
                received = sent[d]
                grad_w = diff.normal_backward_inputs(
                    d, received["recv_x"], received["recv_x"], received["recv_topk_weights"]
                )
                terms.append(grad_w[1][row, k])
        assert len(terms) >= 3
        assert record["expected"] == total(terms) and record["actual"] == total(reversed(terms))


@pytest.mark.parametrize(
    ("mutant", "case", "ops", "tensor", "rank", "index"),
    [
        ("broken_recv_count", "ll_bf16", ["low_latency_dispatch"], "recv_count", 1, [0]),
        # L = 2; with and without topk_idx
        ("broken_expert_list", "normal", ["dispatch", "dispatch_no_topk"], "num_recv_tokens_per_expert_list", 0, [1]),
    ],
)
def test_off_by_one_count(report: diff.Report, mutant: str, case: str, ops, tensor: str, rank: int, index) -> None:
    assert _failing(report, mutant, case) == {(op, tensor, rank) for op in ops}
    records = _mismatches(report, mutant, case)
    assert [r["op"] for r in records] == ops
    assert all(r["index"] == index and r["actual"] == r["expected"] + 1 for r in records)


def test_dropped_minus_one_rule(report: diff.Report) -> None:
    records = _mismatches(report, "broken_minus_one", "sparse", "get_dispatch_layout", "num_tokens_per_expert")
    inputs = diff.build_inputs(CASES["sparse"], WORLD)
    last = inputs.workload.num_experts - 1
    for rank in range(WORLD):
        invalid = int((inputs.workload.topk_idx[rank] < 0).sum())
        assert invalid > 0
        (mine,) = [m for m in records if m["rank"] == rank]  # exactly one element per rank
        assert mine["index"] == [last] and mine["actual"] - mine["expected"] == invalid
    assert _mismatches(report, "broken_minus_one", "sparse")[0]["op"] == "get_dispatch_layout"


def test_int8_tolerance_of_spec_section_9(report: diff.Report) -> None:
    (one,) = [c for c in _checks(report, "int8_off_by_one", "ll_int8") if c["tensor"] == "recv_x" and c["rank"] == 0]
    assert one["rule"] == "int8" and one["passed"] and not one["bit_equal"] and one["max_abs_err"] == 1
    assert one["first_difference"]["index"] == [0, 0, 0]
    row = [r for r in report.rows() if r["participant"] == _label("int8_off_by_one")]
    dispatch = [r for r in row if r["op"] == "low_latency_dispatch"][0]
    assert dispatch["passed"] and not dispatch["bit_equal"]
    (two,) = _mismatches(report, "int8_off_by_two", "ll_int8", "low_latency_dispatch", "recv_x")
    assert (two["rank"], two["index"], abs(two["actual"] - two["expected"])) == (0, [0, 0, 0], 2)


def test_command_line_exits_non_zero_on_a_mismatch(tmp_path, capsys) -> None:
    path = tmp_path / "r.json"
    argv = ["--world", "2", "--families", "uniform", "--modes", "normal", "--dtypes", "bf16", "--quiet"]
    setup = "test_harness_mutants:register_broken_backends"
    status = crosscheck.main([*argv, "--backend", "broken_flipped_bit", "--setup", setup, "--json", str(path)])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "broken_flipped_bit@cpu vs spec" in out and "RESULT: FAIL" in out
    assert "first mismatches" in out and "dispatch.recv_x[2, 3]" in out
    report = path.read_text()
    assert '"result": "FAIL"' in report and '"tensor": "recv_x"' in report


def test_an_unordered_oracle_and_a_malformed_layout_range() -> None:
    """Canonical row order applies when either side declares it (any backend may be the oracle); a layout_range
    of the wrong shape is a failing check, with the rows compared in place, not a crash of the whole run."""
    oracle, short = "reordered_rows", "broken_short_layout_range"
    participants = [diff.Participant.parse(p) for p in (oracle, "spec", short)]
    cases = [CASES["ll_bf16"], CASES["ll_int8"]]
    report = diff.run_local(WORLD, diff.Plan(participants, cases, comm_timeout=60), setup=register_broken_backends)
    assert not report.errors, report.format()
    spec = [c for c in report.checks if c["participant"] == "spec"]
    assert spec and all(c["passed"] for c in spec), report.format()
    failing = {(c["op"], c["tensor"]) for c in report.checks if c["participant"] == _label(short) and not c["passed"]}
    assert ("low_latency_dispatch", "layout_range") in failing
    assert {op for op, _ in failing} == {"low_latency_dispatch"}  # its combine is right
    assert f"[{_label(short)} vs {_label(oracle)}, dtype/shape]" in report.format()  # not "1 of 0 failing"


def test_signed_weights_catch_a_combine_that_drops_the_sign(report: diff.Report) -> None:
    failing = _failing(report, "broken_abs_weights", "normal")
    for op in ("combine", "combine_backward", "combine_worst"):  # the backward's weight gradient is signed too
        assert (op, "combined_topk_weights", 0) in failing, op
    assert {op for op, _, _ in failing} == {"combine", "combine_backward", "combine_worst"}
    ll = _failing(report, "broken_abs_weights_ll", "ll_bf16")
    assert ll == {("low_latency_combine", "combined_x", rank) for rank in range(WORLD)}


def test_cached_dispatch_of_scales(report: diff.Report) -> None:
    """The case's own (fp8, scales) x through cached dispatch; the gradient is bf16 and has no scales."""
    failing = _failing(report, "broken_cached_scales", "normal_fp8")
    ops = ("cached_dispatch_x", "cached_dispatch_worst")
    assert failing == {(op, "recv_x_scales", rank) for op in ops for rank in range(WORLD)}
    assert not _failing(report, "broken_cached_scales", "normal")  # bf16 x: nothing to zero


def test_num_worst_tokens_and_a_dispatch_without_topk(report: diff.Report) -> None:
    worst = _failing(report, "broken_ignores_worst", "normal")
    assert {op for op, _, _ in worst} == {"dispatch_worst", "cached_dispatch_worst"}, worst
    tensor = "num_recv_tokens_per_expert_list"
    assert ("dispatch_worst", "recv_x", 0) in worst and ("dispatch_worst", tensor, 0) in worst
    no_topk = _failing(report, "broken_no_topk_counts", "normal")
    assert no_topk == {("dispatch_no_topk", tensor, r) for r in range(WORLD)}
    for op in ("dispatch_no_topk", "dispatch_worst", "cached_dispatch_x", "cached_dispatch_worst", "combine_worst"):
        row = [r for r in report.rows() if r["op"] == op and r["participant"] == _label("broken_flipped_bit")]
        assert row and row[0]["cases"] == 4, op  # the normal-mode cases, in the table


def test_expert_counts_as_a_tensor_fail(report: diff.Report) -> None:
    failing = _failing(report, "broken_tensor_counts", "normal")
    assert {(op, tensor) for op, tensor, _ in failing} == {
        (op, "num_recv_tokens_per_expert_list") for op in ("dispatch", "dispatch_no_topk", "dispatch_worst")
    }  # the empty list of a num_worst_tokens dispatch too
    (record, *_) = _mismatches(report, "broken_tensor_counts", "normal")
    assert record["note"] == "not a Python list of int" and record["actual"].startswith("torch.int64")
