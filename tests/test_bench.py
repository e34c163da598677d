"""Smoke test of tools/bench.py: a tiny run of both modes on 2 gloo ranks; the report's schema and its byte
counts against an independent count from the routing. No timing assertions."""

from __future__ import annotations

import json
import statistics
import sys

import pytest

from tools import bench

RANKS, TOKENS, LL_TOKENS, HIDDEN, TOPK, EXPERTS, DROP = 2, 24, 8, 128, 3, 8, 0.2
# Per-row / per-message bytes written out by hand for HIDDEN = 128 (DeepEP's accounting, not bench's helpers).
NORMAL_ROW = {"bfloat16": 256, "fp8": 128 + 4}
LL_MESSAGE = {"bfloat16": 16 + 256, "fp8": 16 + 128 + 4}
COMBINE_ROW = 256

RECORD_FIELDS = {
    "impl",
    "program",
    "mode",
    "op",
    "dtype",
    "tokens",
    "time_ms",
    "time_ms_rank_medians",
    "samples_ms_rank0",
    "bytes_per_rank",
    "bytes_each_rank",
    "cross_bytes_per_rank",
    "cross_bytes_each_rank",
    "wire_cross_bytes_per_rank",
    "wire_cross_bytes_each_rank",
    "gbps",
    "cross_gbps",
    "raw_a2a_ms",
    "ratio_to_raw_a2a",
    "host_ms",
    "host_ms_rank_medians",
}


def _routing(num_tokens: int) -> list[list[set[int]]]:
    """Destination ranks of every token of every rank: [source][token] -> set of ranks."""
    local = EXPERTS // RANKS
    out = []
    for rank in range(RANKS):
        topk_idx, _ = bench.make_routing(rank, num_tokens, EXPERTS, TOPK, seed=0, drop=DROP)
        out.append([{int(e) // local for e in row if e >= 0} for row in topk_idx.tolist()])
    return out


def _ll_selections(num_tokens: int) -> list[list[int]]:
    """[source][destination]: valid (token, k) selections of source's tokens whose expert lives on destination."""
    local = EXPERTS // RANKS
    out = []
    for rank in range(RANKS):
        topk_idx, _ = bench.make_routing(rank, num_tokens, EXPERTS, TOPK, seed=0, drop=DROP)
        counts = [0] * RANKS
        for e in topk_idx.flatten().tolist():
            if e >= 0:
                counts[e // local] += 1
        out.append(counts)
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("bench") / "report.json"
    argv = [
        "--ranks", str(RANKS), "--mode", "all", "--tokens", str(TOKENS), "--ll-tokens", str(LL_TOKENS),
        "--hidden", str(HIDDEN), "--topk", str(TOPK), "--experts", str(EXPERTS), "--dtype", "bfloat16", "fp8",
        "--drop", str(DROP), "--iters", "1", "--warmup", "0", "--quiet", "--backend", "reference",
        "--json", str(path),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    return json.loads(path.read_text())


def test_report_schema(report: dict) -> None:
    assert report["schema"] == bench.SCHEMA
    for key in ("created", "program", "command", "impl", "machine", "config", "timing", "byte_accounting"):
        assert report[key], key
    assert report["machine"]["ranks"] == RANKS and report["machine"]["dist_backend"] == "gloo"
    impls = {r["impl"] for r in report["records"]}
    assert impls == {bench.RAW, "deep_ep:reference"}
    ops = {(r["impl"], r["mode"], r["op"], r["dtype"]) for r in report["records"]}
    ours = "deep_ep:reference"
    for dtype in ("bfloat16", "fp8"):
        for op in ("dispatch", "dispatch_cached"):
            assert (ours, "normal", op, dtype) in ops
        assert (bench.RAW, "normal", "dispatch", dtype) in ops
        for op in ("dispatch", "combine", "dispatch+combine"):
            assert (ours, "ll", op, dtype) in ops and (bench.RAW, "ll", op, dtype) in ops
    assert (ours, "normal", "layout", "-") in ops and (ours, "normal", "combine", "bfloat16") in ops
    # The round trip (issue 7's dispatch + combine) is the sum of its two figures, the baseline's likewise.
    by = {(r["impl"], r["op"], r["dtype"]): r for r in report["records"] if r["mode"] == "normal"}
    for impl, first in ((ours, "dispatch_cached"), (bench.RAW, "dispatch")):
        for dtype in ("bfloat16", "fp8"):
            pair, a, b = by[impl, bench.ROUND_TRIP, dtype], by[impl, first, dtype], by[impl, "combine", "bfloat16"]
            assert pair["time_ms"] == pytest.approx(a["time_ms"] + b["time_ms"])
            assert pair["bytes_each_rank"] == [x + y for x, y in zip(a["bytes_each_rank"], b["bytes_each_rank"])]
            raw = by[bench.RAW, bench.ROUND_TRIP, dtype]["time_ms"]
            assert impl == bench.RAW or pair["ratio_to_raw_a2a"] == pytest.approx(pair["time_ms"] / raw)
    for rec in report["records"]:
        assert RECORD_FIELDS <= set(rec), RECORD_FIELDS - set(rec)
        assert rec["time_ms"] > 0 and len(rec["time_ms_rank_medians"]) == RANKS and len(rec["samples_ms_rank0"]) == 1
        if rec["op"] == "layout":
            assert rec["bytes_per_rank"] is None and rec["ratio_to_raw_a2a"] is None
            continue
        assert len(rec["bytes_each_rank"]) == RANKS and rec["gbps"] > 0
        assert rec["raw_a2a_ms"] > 0 and rec["ratio_to_raw_a2a"] > 0
        # What went through all_to_all_single (sender side per rank; DeepEP's counts take either side, so only
        # the totals compare): the raw baseline moves exactly the cross-rank payload.
        wire, cross = sum(rec["wire_cross_bytes_each_rank"]), sum(rec["cross_bytes_each_rank"])
        if rec["impl"] == bench.RAW:
            assert wire == cross, rec
        elif rec["mode"] == "normal":
            assert wire >= cross, rec
    # The profile-free, plot-free run still says where its numbers come from.
    assert {"normal.dispatch", "normal.combine", "ll.dispatch", "ll.combine", "cross"} <= set(report["byte_accounting"])


def test_normal_bytes_match_an_independent_count(report: dict) -> None:
    dests = _routing(TOKENS)
    received = [sum(d in token for src in dests for token in src) for d in range(RANKS)]
    own = [sum(d in token for token in dests[d]) for d in range(RANKS)]
    for rec in report["records"]:
        if rec["mode"] != "normal" or rec["op"] == "layout":
            continue
        row = {"combine": COMBINE_ROW, bench.ROUND_TRIP: NORMAL_ROW[rec["dtype"]] + COMBINE_ROW}.get(
            rec["op"], NORMAL_ROW.get(rec["dtype"])
        )
        assert rec["bytes_each_rank"] == [received[d] * row for d in range(RANKS)], rec["op"]
        assert rec["cross_bytes_each_rank"] == [(received[d] - own[d]) * row for d in range(RANKS)], rec["op"]
        assert rec["bytes_per_rank"] == sum(received) * row / RANKS


def test_low_latency_bytes_match_an_independent_count(report: dict) -> None:
    sel = _ll_selections(LL_TOKENS)
    sent = [sum(row) for row in sel]  # DeepEP counts each rank's own valid selections
    cross = [sum(row) - row[s] for s, row in enumerate(sel)]
    for rec in report["records"]:
        if rec["mode"] != "ll":
            continue
        dispatch, combine = LL_MESSAGE[rec["dtype"]], COMBINE_ROW
        per = {"dispatch": dispatch, "combine": combine, "dispatch+combine": dispatch + combine}[rec["op"]]
        assert rec["bytes_each_rank"] == [n * per for n in sent], (rec["op"], rec["dtype"])
        assert rec["cross_bytes_each_rank"] == [n * per for n in cross], (rec["op"], rec["dtype"])


def test_table_and_merge(report: dict) -> None:
    merged = bench.merge_reports([report, report])
    assert len(merged["records"]) == 2 * len(report["records"])
    text = bench.format_table(merged)
    assert "deep_ep:reference" in text and "dispatch+combine" in text


def test_markdown_puts_each_source_and_the_legend_on_its_own_list_item(report: dict) -> None:
    # Plain consecutive lines would render as one run-on paragraph; a bare '*' footnote as an empty list item.
    other = dict(report, records=[dict(r, bytes_per_rank=1.0) for r in report["records"]])
    text = bench.format_table(bench.merge_reports([report, other]), markdown=True)
    head = text.split("\n\n")[0].splitlines()
    assert len(head) == 3 and all(line.startswith("- ") for line in head), head  # two sources, the legend
    assert "A = " in head[-1] and "\n\\* the implementations moved different byte counts" in text


def test_a_merge_shows_every_report_and_keeps_every_source(report: dict) -> None:
    # Two reports of one program: each keeps its own columns (its implementation and its own raw baseline).
    slower = dict(report, records=[dict(r, time_ms=r["time_ms"] * 2) for r in report["records"]])
    merged = bench.merge_reports([report, slower])
    text = bench.format_table(merged)
    rec = next(r for r in report["records"] if r["impl"] != bench.RAW and r["op"] == "combine")
    for factor in (1, 2):
        assert f"{rec['time_ms'] * factor:.3f}" in text, factor
    assert "(report 1)" in text and "(report 2)" in text
    # A merge of a merge keeps the inner reports' sources, and every record its source.
    again = bench.merge_reports([merged, report])
    assert len(again["sources"]) == 3 and all(s["program"] != "merge" for s in again["sources"])
    assert sorted({r["source"] for r in again["records"]}) == [0, 1, 2]


def _config(argv: list[str]) -> bench.BenchConfig:
    parser = bench.build_parser()
    return bench.config_from_args(parser.parse_args(argv), parser)


def test_back_to_back_timing_is_refused_without_gpu_ranks(capsys: pytest.CaptureFixture) -> None:
    # A CPU world is timed call by call after barriers; a report saying "back-to-back" would misstate its method.
    with pytest.raises(SystemExit) as exit_info:
        _config(["--timing", "back-to-back"])
    assert exit_info.value.code == 2 and "--dist-backend nccl" in capsys.readouterr().err
    assert _config(["--timing", "back-to-back", "--dist-backend", "nccl"]).timing == "back-to-back"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "64,abc"], "--tokens 64,abc: give whole numbers"),
        (["--ll-tokens", "1.5"], "--ll-tokens 1.5: give whole numbers"),
        (["--hidden", "0"], "--hidden and --experts must be >= 1"),
        (["--experts", "0", "--topk", "0"], "--hidden and --experts must be >= 1"),
        (["--topk", "-1"], "--topk >= 0"),
        (["--drop", "1.5"], "--drop=1.5 is not a fraction"),
        (["--drop", "-0.1"], "--drop=-0.1 is not a fraction"),
        (["--ranks", "0"], "the group size must be >= 1"),
        (["--num-sms", "0"], "--num-sms=0 must be >= 1"),
    ],
)
def test_impossible_arguments_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _config(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_torchrun_launcher_outside_torchrun_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        _config(["--launcher", "torchrun"])
    assert exit_info.value.code == 2 and "WORLD_SIZE is not set" in capsys.readouterr().err


def test_merge_of_a_missing_or_foreign_file_is_a_usage_error(tmp_path, capsys: pytest.CaptureFixture) -> None:
    foreign, broken = tmp_path / "foreign.json", tmp_path / "broken.json"
    foreign.write_text('{"records": []}')
    broken.write_text("{")
    for path, message in ((tmp_path / "missing.json", "No such file"), (foreign, "not a"), (broken, "Expecting")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--merge", str(path)])
        assert exit_info.value.code == 2 and f"--merge {path}: " in (err := capsys.readouterr().err), err
        assert message in err


def test_repeated_sizes_run_once() -> None:
    assert bench._int_list(["32", "64,32", "128"]) == [32, 64, 128]


def test_kernel_time_rows_count_every_ranks_bytes() -> None:
    # Kernel times come from rank 0 only; their bytes must still be every rank's mean, as in the op's own row.
    def rec(op: str, nbytes: int) -> dict:
        return dict(impl="x", mode="ll", op=op, dtype="bfloat16", tokens=8, times=[0.001], bytes=nbytes, cross_bytes=0)

    ranks = [{"records": [rec("dispatch", 100), rec("kernels dispatch", 100)]}, {"records": [rec("dispatch", 300)]}]
    rows = {r["op"]: r for r in bench.aggregate(ranks)}
    assert rows["kernels dispatch"]["bytes_per_rank"] == rows["dispatch"]["bytes_per_rank"] == 200


def test_a_round_trip_of_no_bytes_has_a_rate_of_zero_as_its_parts() -> None:
    # Every selection dropped (or one rank's cross bytes): 0 GB/s in every row, the summed round trip's included.
    def rec(op: str) -> dict:
        return dict(impl="x", mode="normal", op=op, dtype="bfloat16", tokens=8, times=[0.001], bytes=0, cross_bytes=0)

    rows = {r["op"]: r for r in bench.aggregate([{"records": [rec("dispatch_cached"), rec("combine")]}])}
    for op in ("dispatch_cached", "combine", bench.ROUND_TRIP):
        assert rows[op]["gbps"] == 0.0 and rows[op]["cross_gbps"] == 0.0, op


def test_progress_total_counts_the_gpu_only_rows() -> None:
    # docs/results/2026-11-22-h200-session10/run10b/cuda.txt printed "[ 12/4]": graph and kernel rows not counted.
    cfg = bench.BenchConfig(tokens=[8], ll_tokens=[8, 16], mode="ll", dtypes=["bfloat16", "fp8"])
    cfg.ll_graph = cfg.ll_kernel_times = True
    sizes = len(cfg.ll_tokens) * len(cfg.dtypes)
    assert cfg.num_steps(gpu=False) == sizes * 2  # the pair, ours and the raw one's; GPU-only rows never run
    assert cfg.num_steps(gpu=True, op_alone=True) == sizes * (2 + 3 + 2)  # + graph pair, graph ops, kernel ops
    assert cfg.num_steps(gpu=True, op_alone=False) == sizes * (2 + 1 + 2)  # upstream DeepEP: the pair's graph only
    cfg.mode = "normal"
    assert cfg.num_steps(gpu=True) == 1 + 3 * 2 + 2  # layout; fresh, cached, raw per dtype; combine and its raw


def test_plot_is_optional(report: dict, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: a message, no file, no error
    path = tmp_path / "plot.png"
    assert "matplotlib is not installed" in bench.plot(report, str(path))
    assert not path.exists()


def test_timeline_of_a_trace() -> None:
    """Two calls: the first with two overlapping kernels after a 100 us launch gap, the second with none."""
    trace = {
        "traceEvents": [
            {"name": bench.CALL_MARK, "cat": "user_annotation", "ts": 1000, "dur": 300},
            {"name": "push", "cat": "kernel", "ts": 1100, "dur": 400, "args": {"correlation": 7}},
            {"name": "cuLaunchKernelEx", "cat": "cuda_driver", "ts": 1090, "dur": 9, "args": {"correlation": 7}},
            {"name": "Memcpy DtoD", "cat": "gpu_memcpy", "ts": 1450, "dur": 100},
            {"name": "aten::copy_", "cat": "cpu_op", "ts": 1010, "dur": 5},
            {"name": bench.CALL_MARK, "cat": "user_annotation", "ts": 2000, "dur": 50},
        ]
    }
    lines = bench.timeline(trace).splitlines()
    assert lines[1] == (
        "call 0: host 300 us; first GPU op at +100; GPU span 450 us, busy 450 us (idle 0); done at +550"
    )
    assert lines[2].split() == ["+90", "+100", "400.0", "push"] and lines[3].split()[:2] == ["+450", "100.0"]
    assert lines[4] == "call 1: host 50 us, no GPU operation"
    gap = {"name": "late", "cat": "kernel", "ts": 1700, "dur": 50}
    trace["traceEvents"].append(gap)
    assert "busy 500 us (idle 150)" in bench.timeline(trace).splitlines()[1]


def test_timeline_gives_each_op_to_the_call_that_issued_it() -> None:
    """A device that lags the host: call 0's kernel starts after call 1 began. (docs/results/2026-11-22-4xh200-
    session6/receiver-copy-experiment/profile_sms20.txt read 'call 1: ..., no GPU operation' and listed call 1's
    kernel under call 2, issued at -61 us.)"""
    trace = [
        {"name": bench.CALL_MARK, "cat": "user_annotation", "ts": 0, "dur": 10},
        {"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ts": 5, "dur": 1, "args": {"correlation": 1}},
        {"name": bench.CALL_MARK, "cat": "user_annotation", "ts": 20, "dur": 10},
        {"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ts": 25, "dur": 1, "args": {"correlation": 2}},
        {"name": "first", "cat": "kernel", "ts": 30, "dur": 100, "args": {"correlation": 1}},
        {"name": "second", "cat": "kernel", "ts": 130, "dur": 100, "args": {"correlation": 2}},
    ]
    lines = bench.timeline(trace).splitlines()
    calls = [line for line in lines if line.startswith("call ")]
    assert calls == [
        "call 0: host 10 us; first GPU op at +30; GPU span 100 us, busy 100 us (idle 0); done at +130",
        "call 1: host 10 us; first GPU op at +110; GPU span 100 us, busy 100 us (idle 0); done at +210",
    ]
    assert lines[2].split() == ["+5", "+30", "100.0", "first"] and lines[4].split() == ["+5", "+110", "100.0", "second"]


def test_device_time_per_range_sums_the_ops_each_range_issued() -> None:
    """Kernels count toward the range whose host span holds their launch, wherever they run on the device:
    the dispatch's second kernel runs after the combine range began, and a graph launch issues two kernels."""
    d, c = "deep_ep_bench.kernels.dispatch", "deep_ep_bench.kernels.combine"
    events = [
        {"name": d, "cat": "user_annotation", "ts": 0, "dur": 20},
        {"name": "cuLaunchKernel", "cat": "cuda_driver", "ts": 5, "dur": 2, "args": {"correlation": 1}},
        {"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ts": 12, "dur": 2, "args": {"correlation": 2}},
        {"name": c, "cat": "user_annotation", "ts": 30, "dur": 10},
        {"name": "cudaGraphLaunch", "cat": "cuda_runtime", "ts": 31, "dur": 3, "args": {"correlation": 3}},
        {"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ts": 50, "dur": 2, "args": {"correlation": 4}},
        {"name": "push", "cat": "kernel", "ts": 10, "dur": 7.5, "args": {"correlation": 1}},
        {"name": "receive", "cat": "kernel", "ts": 33, "dur": 4, "args": {"correlation": 2}},
        {"name": "graph a", "cat": "kernel", "ts": 40, "dur": 3, "args": {"correlation": 3}},
        {"name": "graph b", "cat": "gpu_memcpy", "ts": 44, "dur": 1, "args": {"correlation": 3}},
        {"name": "outside", "cat": "kernel", "ts": 55, "dur": 100, "args": {"correlation": 4}},
        {"name": d, "cat": "user_annotation", "ts": 60, "dur": 5},
    ]
    assert bench.device_time_per_range({"traceEvents": events}) == {d: [11.5, 0.0], c: [4.0]}


class _TickEvent:
    """EMULATION of torch.cuda.Event (the vendor API): records a tick counter that the timed calls advance
    instead of a device clock, so the samples say which calls were kept without timing anything."""

    clock = 0

    def __init__(self, enable_timing: bool = False) -> None:
        self.at = None

    def record(self) -> None:
        self.at = _TickEvent.clock

    def elapsed_time(self, end: _TickEvent) -> float:
        return float(end.at - self.at) * 1e3  # "ms", so that the sample reads in ticks (seconds)


def test_back_to_back_timing_keeps_all_but_the_first_call_of_each_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.torch.cuda, "Event", _TickEvent)
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda device=None: None)
    cfg = bench.BenchConfig(tokens=[1], ll_tokens=[1], iters=23, warmup=2, timing="back-to-back")
    rank_bench = bench.RankBench(0, 1, cfg, bench.Impl())
    calls: list[int] = []

    def op() -> None:  # call k of a burst takes k + 1 ticks
        calls.append(1)
        _TickEvent.clock += len(calls)

    monkeypatch.setattr(rank_bench, "barrier", calls.clear)  # a burst starts after a barrier
    ((samples,),) = rank_bench._measure_back_to_back([[op]])
    bursts = [list(range(2, bench.BURST + 2))] * (cfg.iters // bench.BURST)
    bursts.append(list(range(2, cfg.iters % bench.BURST + 2)))
    assert samples == [float(t) for burst in bursts for t in burst]  # 23 samples; each burst's first dropped


def test_gpu_host_issue_times_reach_the_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle GPU timing keeps the host's issuing time per call; the report carries it as host_ms (the max over ranks
    of the per-rank medians, as time_ms), summed into the round trip; runs without host times report None."""
    monkeypatch.setattr(bench.torch.cuda, "Event", _TickEvent)
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda device=None: None)
    cfg = bench.BenchConfig(tokens=[8], ll_tokens=[8], iters=3, warmup=0, progress=False)
    runner = bench.RankBench(0, 1, cfg, bench.Impl())
    runner.device = bench.torch.device("cuda")  # the GPU path, driven by the tick clock (nothing runs on a device)
    monkeypatch.setattr(runner, "barrier", lambda: None)
    for op in ("dispatch_cached", "combine"):
        ((times,),) = runner.measure([lambda: None])
        runner.record("x", "normal", op, "bfloat16", 8, times, (10, 5), announce=False)
    host = {r["op"]: r["host_times"] for r in runner.records}
    rows = {r["op"]: r for r in bench.aggregate([{"records": runner.records}])}
    for op in ("dispatch_cached", "combine"):
        assert len(host[op]) == cfg.iters
        assert rows[op]["host_ms"] == pytest.approx(statistics.median(host[op]) * 1e3)
        assert rows[op]["host_ms_rank_medians"] == [rows[op]["host_ms"]]
    trip = rows[bench.ROUND_TRIP]
    assert trip["host_ms"] == pytest.approx(rows["dispatch_cached"]["host_ms"] + rows["combine"]["host_ms"])
    cpu = dict(runner.records[0], host_times=None)
    assert bench.aggregate([{"records": [cpu]}])[0]["host_ms"] is None


def _wire_of_both_forms(rank: int, world: int) -> list:
    import torch
    import torch.distributed as dist

    runner = bench.RankBench(rank, world, bench.BenchConfig(tokens=[1], ll_tokens=[1], ranks=world), impl=None)
    rows = torch.zeros(world * 3, 5, dtype=torch.uint8)  # 3 rows of 5 bytes to every rank
    single = runner.wire_bytes(lambda: dist.all_to_all_single(torch.empty_like(rows), rows))
    blocks = list(rows.split(3))
    listed = runner.wire_bytes(lambda: dist.all_to_all([torch.empty_like(b) for b in blocks], blocks))
    return [single, listed, runner.wire_bytes(lambda: None)]


def test_wire_bytes_counts_both_all_to_all_forms() -> None:
    from deep_ep.testing import run_ranks

    for single, listed, nothing in run_ranks(3, _wire_of_both_forms):
        assert single == listed == 2 * 3 * 5 and nothing is None
