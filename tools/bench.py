"""DeepEP-comparable benchmarks of a deep_ep backend, side by side with a raw all_to_all_single.

Normal mode: get_dispatch_layout, dispatch (fresh, and cached with the handle), combine.
Low-latency mode: low_latency_dispatch, low_latency_combine, and the pair.
Every figure is also given as a ratio to an `all_to_all_single` that moves the same payload with the same
split sizes (uint8 rows, preallocated), timed the same way in the same process.

    python tools/bench.py --ranks 2 --tokens 128 256 512 --ll-tokens 8 16 32
    python tools/bench.py --ranks 4 --mode normal --dtype bfloat16 fp8 --json out.json --plot out.png
    torchrun --nproc-per-node 4 tools/bench.py --launcher torchrun --dist-backend nccl --tokens 4096
    python tools/bench.py --merge ours.json upstream.json --json all.json --plot all.png

Timing: `--warmup` untimed rounds, then `--iters` timed rounds, each after a barrier (a one-element
all_reduce, plus a device synchronisation on GPUs); an op and its raw baseline alternate round by round.
CPU: time.perf_counter around the call. GPU: a pair of torch.cuda.Event around the call (the host part of
the call counts too: the device is idle at the start event); the host's own time to issue each call is kept
as well ("host_ms" in the JSON, "(host X ms)" on rank 0's progress lines). A figure is the max over ranks
of each rank's median. `--timing back-to-back` (GPUs) times as DeepEP's tests do instead: bursts of calls
issued back to back, an event pair around each (see TIMING).

Byte accounting follows DeepEP's tests (see BYTE_ACCOUNTING, written into the JSON); "cross" counts only
what moves between two different ranks. Per-rank byte figures are means over ranks; GB/s = 1e9 bytes/s.

Upstream DeepEP is measured by tools/bench_deepep.py, which reuses this harness without importing this
repository's `deep_ep` package (nothing here imports it at module level).
"""

from __future__ import annotations

import argparse
import bisect
import cProfile
import datetime
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

SCHEMA = "deep_ep-bench/1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW = "raw all_to_all_single"
CALL_MARK = "deep_ep_bench.call"  # the profiler range around each profiled call (see `timeline`)
GPU_TRACE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
DTYPES = ("bfloat16", "fp8")
_DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp8": "fp8", "float8_e4m3fn": "fp8"}

# Where every byte count comes from; written into the JSON next to the numbers.
BYTE_ACCOUNTING = {
    "normal.dispatch": (
        "rows this rank receives (its own rows included) x bytes per row: bf16 hidden*2; fp8 hidden + hidden/128*4 "
        "(data + fp32 scales). DeepEP tests/test_intranode.py: dispatch_bf16_nvl_recv_bytes = recv_x.numel() * 2, "
        "times fp8_factor = (1 + 4 / 128) / 2 for fp8. Same count for cached dispatch."
    ),
    "normal.combine": (
        "the same received rows x hidden * 2 (bf16), sent back. DeepEP tests/test_intranode.py: "
        "combine_bf16_nvl_send_bytes = dispatch_bf16_nvl_recv_bytes."
    ),
    "ll.dispatch": (
        "valid selections (topk_idx != -1) of this rank's tokens, own rank included, x bytes per message: "
        "fp8 16 + hidden + hidden/128*4, bf16 16 + hidden*2. DeepEP tests/test_low_latency.py: num_fp8_bytes = "
        "hidden + hidden / 128 * 4 + 16, num_dispatch_comm_bytes += num_fp8_bytes * num_selections; the 16-byte "
        "header is DeepEP's message layout (num_bytes_per_msg = sizeof(int4) + payload), so bf16 gets it too."
    ),
    "ll.combine": (
        "the same selections x hidden * 2. DeepEP tests/test_low_latency.py: num_bf16_bytes = hidden * 2, "
        "num_combine_comm_bytes += num_bf16_bytes * num_selections."
    ),
    "normal.dispatch_cached+combine": (
        "normal.dispatch (cached) + normal.combine, bytes and times of the two separately timed ops summed (the "
        "raw baseline's too): the form of issue 7's targets (dispatch + combine) and of DeepEP's tuning figures."
    ),
    "ll.dispatch+combine": "ll.dispatch + ll.combine (DeepEP's 'Dispatch + combine bandwidth').",
    "cross": "the same count restricted to rows/messages whose source and destination ranks differ.",
    "wire": (
        "wire_cross_bytes_per_rank: what the implementation itself sent to other ranks through "
        "torch.distributed.all_to_all_single or all_to_all in one untimed call (counted by wrapping them; packed "
        "metadata, padding and fixed-size slots included). None where the implementation moves data otherwise "
        "(upstream DeepEP's NVLink kernels). Per rank it is the sending side; DeepEP's per-rank counts take the "
        "receiving side for normal dispatch and low-latency combine, so compare means (totals), not single ranks."
    ),
    "per_rank": "bytes_per_rank is the mean over ranks of each rank's count; the per-rank counts are kept too.",
    "raw_a2a": (
        "all_to_all_single of uint8 rows of exactly the payload above, with the op's split sizes (rows per "
        "(source, destination) pair; in low-latency mode one row per selection), own-rank block included "
        "(a local copy). Combine baselines use the transposed splits."
    ),
}
TIMING = (
    "warmup untimed rounds, then iters timed rounds, each after a barrier (1-element all_reduce + device sync); "
    "CPU: time.perf_counter; GPU: torch.cuda.Event pairs, synchronised after the last round; per rank the median, "
    "reported figure = max over ranks of the per-rank medians. An op and its raw baseline (fresh and cached dispatch "
    "and their baseline) alternate round by round, so they see the same machine conditions. Low-latency dispatch and "
    "combine are timed inside the same round (dispatch, then combine, no barrier between); dispatch+combine is their "
    "sum per round. With --timing back-to-back (GPU only; DeepEP's own tests time this way): after a barrier, "
    "bursts of calls issued back to back, an event pair around each, one synchronisation after the burst; the first "
    "call of each burst (which starts from an idle device) is dropped, so a figure is the device's time per call "
    "while the host keeps ahead of it (where a call waits for the host, as a fresh dispatch does, it is not)."
)
BURST = 10  # back-to-back timing: calls per burst (candidates alternate burst by burst)
KERNEL_CALLS = 20  # --ll-kernel-times: profiled calls per op
KERNEL_TIMES = (
    "'kernels <op>': the summed device durations of the kernels (and copies) that one call runs, per call, "
    "from torch.profiler (CUPTI) on rank 0 (its median; the other ranks make the same calls unprofiled). "
    "DeepEP's tests/test_low_latency.py reports this (bench_kineto: kernel durations by name), so gaps between "
    "kernels and host time do not count. Calls are CUDA-graph replays of one op where the implementation allows "
    "capturing it alone (deep_ep), else eager calls issued back to back (upstream DeepEP, whose buffer flips on "
    "the host at every call)."
)


# ---- workload (DeepEP-style, seeded per rank) ---------------------------------------------------------
def make_routing(
    rank: int, num_tokens: int, num_experts: int, num_topk: int, *, seed: int = 0, drop: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's routing like DeepEP's tests: top-k of |randn| + 1 scores (distinct experts per token).

    Returns topk_idx int64 [N, K] (a `drop` fraction of entries set to -1) and topk_weights float32 [N, K]
    (0 where -1). Deterministic in (seed, rank, num_tokens), on the CPU.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + num_tokens)
    scores = torch.randn(num_tokens, num_experts, generator=gen).abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=False).indices.long()
    if drop > 0:
        topk_idx = torch.where(torch.rand(topk_idx.shape, generator=gen) < drop, -1, topk_idx)
    weights = torch.rand(num_tokens, num_topk, generator=gen) + 0.1
    return topk_idx, torch.where(topk_idx >= 0, weights, torch.zeros_like(weights))


def make_x(rank: int, num_tokens: int, hidden: int, *, seed: int = 0) -> torch.Tensor:
    """bf16 [N, H] of randn, deterministic in (seed, rank, num_tokens), on the CPU."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + num_tokens + 1)
    return torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)


def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP's test cast: e4m3 [N, H] and fp32 scales [N, H/128] (amax / 448 per 128 channels)."""
    m, n = x.shape
    view = x.float().view(m, -1, 128)
    amax = view.abs().amax(dim=2).clamp(min=1e-4)
    q = (view * (448.0 / amax.unsqueeze(2))).to(torch.float8_e4m3fn).view(m, n)
    return q, amax / 448.0


def normal_row_bytes(hidden: int, dtype: str) -> int:
    """Bytes of one dispatched row in normal mode (DeepEP's accounting)."""
    return hidden + hidden // 128 * 4 if dtype == "fp8" else hidden * 2


def ll_message_bytes(hidden: int, dtype: str) -> int:
    """Bytes of one low-latency dispatch message: DeepEP's 16-byte header plus the payload."""
    return 16 + (hidden + hidden // 128 * 4 if dtype == "fp8" else hidden * 2)


# ---- implementations --------------------------------------------------------------------------------
class Impl:
    """Builds DeepEP-API buffers for one implementation; everything else is the same DeepEP API."""

    index_dtype: torch.dtype = torch.int64
    # Whether one low-latency op may be captured in a CUDA graph and replayed on its own (op 'graph dispatch').
    ll_op_alone_capturable: bool = True

    def normal_buffer(self, group: dist.ProcessGroup, hidden: int, num_ranks: int) -> Any:
        raise NotImplementedError

    def ll_buffer(self, group: dist.ProcessGroup, tokens: int, hidden: int, num_ranks: int, num_experts: int) -> Any:
        raise NotImplementedError

    def label(self, buffer: Any) -> str:
        raise NotImplementedError

    def metadata(self) -> dict:
        return {}

    def launch_local(self, world: int, fn: Callable[..., Any], args: tuple, backend: str, timeout: float) -> list:
        """Run fn(rank, world, *args) on a fresh local world; default: spawned processes."""
        return spawn_ranks(world, fn, args, backend=backend, timeout=timeout)


def nvl_bytes_hint(module: Any, hidden: int, num_ranks: int) -> int:
    """DeepEP's README sizing: the larger NVL hint of the default dispatch and combine configs (bf16 rows)."""
    configs = (module.Buffer.get_dispatch_config(num_ranks), module.Buffer.get_combine_config(num_ranks))
    return max(config.get_nvl_buffer_size_hint(hidden * 2, num_ranks) for config in configs)


@dataclass
class DeepEPPortable(Impl):
    """This repository's deep_ep with a chosen backend (imported lazily, from this checkout first)."""

    backend: str = "auto"
    check_agreement: bool = True  # False: skip the façade's per-call agreement all-gather (its cost shows)
    check_values: bool = True  # False: skip the low-latency value checks (a host round trip each call)

    def module(self) -> Any:
        if REPO_ROOT not in sys.path:
            sys.path.insert(0, REPO_ROOT)
        import deep_ep

        if not hasattr(deep_ep, "list_backends"):
            raise RuntimeError(f"'import deep_ep' found {deep_ep.__file__}, not this repository's package")
        return deep_ep

    def normal_buffer(self, group: dist.ProcessGroup, hidden: int, num_ranks: int) -> Any:
        module = self.module()
        buffer = module.Buffer(group, nvl_bytes_hint(module, hidden, num_ranks), backend=self.backend)
        buffer.check_agreement = self.check_agreement
        return buffer

    def ll_buffer(self, group: dist.ProcessGroup, tokens: int, hidden: int, num_ranks: int, num_experts: int) -> Any:
        module = self.module()
        rdma = module.Buffer.get_low_latency_rdma_size_hint(tokens, hidden, num_ranks, num_experts)
        buffer = module.Buffer(
            group, 0, rdma, low_latency_mode=True, num_qps_per_rank=num_experts // num_ranks, backend=self.backend
        )
        buffer.check_agreement = self.check_agreement
        buffer.check_values = self.check_values
        return buffer

    def label(self, buffer: Any) -> str:
        checked = self.check_agreement and self.check_values
        return f"deep_ep:{buffer.backend}" + ("" if checked else " (unchecked)")

    def metadata(self) -> dict:
        module = self.module()
        from deep_ep.kernels import host_ordered_sum

        return {
            "package": "deep_ep (this repository)",
            "version": module.__version__,
            "backend": self.backend,
            "check_agreement": self.check_agreement,
            "check_values": self.check_values,
            "host_ordered_sum": host_ordered_sum.status(),  # which combine sum bf16 host rows get
        }

    def launch_local(self, world: int, fn: Callable[..., Any], args: tuple, backend: str, timeout: float) -> list:
        self.module()
        from deep_ep.testing import run_ranks  # forkserver with torch preloaded: milliseconds per world

        return run_ranks(world, fn, *args, backend=backend, timeout=timeout)


# ---- configuration ---------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """One benchmark run (picklable: it travels to every rank)."""

    tokens: list[int]
    ll_tokens: list[int]
    hidden: int = 7168
    topk: int = 8
    experts: int = 256
    ranks: int = 2
    mode: str = "all"
    dtypes: list[str] = field(default_factory=lambda: ["bfloat16"])
    iters: int = 20
    warmup: int = 5
    seed: int = 0
    drop: float = 0.0
    dist_backend: str = "gloo"
    profile: bool = False
    profile_calls: int = 1
    progress: bool = True
    ll_graph: bool = False  # also time the low-latency pair captured in one CUDA graph (replays), and each op alone
    ll_kernel_times: bool = False  # also the low-latency ops' summed kernel durations (KERNEL_TIMES)
    num_sms: int | None = None  # normal mode: Buffer.set_num_sms(num_sms) first (None: the library's default)
    timing: str = "idle"  # "idle": each call from an idle device; "back-to-back": DeepEP's way (see TIMING)

    @property
    def modes(self) -> list[str]:
        return ["normal", "ll"] if self.mode == "all" else [self.mode]

    def num_steps(self, gpu: bool = False, op_alone: bool = True) -> int:
        """Progress lines a run prints: every announced record (on GPUs the graph and kernel rows too; a graph
        that fails to capture prints none, so this is then an upper bound)."""
        steps = 0
        if "normal" in self.modes:
            steps += len(self.tokens) * (1 + 3 * len(self.dtypes) + 2)
        if "ll" in self.modes:
            per_size = 2  # the pair, ours and the raw baseline's
            if gpu and self.ll_graph:
                per_size += 3 if op_alone else 1  # graph dispatch+combine, and each op alone where allowed
            if gpu and self.ll_kernel_times:
                per_size += 2  # kernels dispatch, kernels combine
            steps += len(self.ll_tokens) * per_size * len(self.dtypes)
        return steps


# ---- one rank ----------------------------------------------------------------------------------------
class RankBench:
    """Runs the configured measurements on one rank; returns raw per-rank samples."""

    def __init__(self, rank: int, world: int, cfg: BenchConfig, impl: Impl) -> None:
        self.rank, self.world, self.cfg, self.impl = rank, world, cfg, impl
        self.group = dist.group.WORLD
        self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.dist_backend == "nccl" else None
        self.device = self.device or torch.device("cpu")
        self.records: list[dict] = []
        self.profiles: list[str] = []
        self.step = 0
        self.label = "?"
        # GPU: id(timed list) -> (that list, seconds the host spent issuing each round)
        self.host_times: dict[int, tuple[list[float], list[float]]] = {}

    # -- timing --
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        flag = torch.ones(1, device=self.device)
        dist.all_reduce(flag, group=self.group)
        self._sync()

    def measure(self, *candidates: Sequence[Callable[[], Any]]) -> list[list[list[float]]]:
        """Seconds per phase per timed round, for each candidate (a sequence of phases run back to back).

        Warm-up rounds, then timed rounds, each phase sequence after its own barrier. Several candidates (an op
        and its raw baseline) alternate round by round, so they see the same machine conditions.
        """
        for _ in range(self.cfg.warmup):
            for phases in candidates:
                for phase in phases:
                    phase()
        self._sync()
        if self.cfg.timing == "back-to-back" and self.device.type == "cuda":
            return self._measure_back_to_back(candidates)
        samples: list[list[list[float]]] = [[[] for _ in phases] for phases in candidates]
        host: list[list[float]] = [[] for _ in candidates]  # GPU: seconds the host spent issuing each round
        pending = []
        for _ in range(self.cfg.iters):
            for c, phases in enumerate(candidates):
                self.barrier()
                if self.device.type == "cuda":
                    events = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
                    events[0].record()
                    start = time.perf_counter()
                    for phase, event in zip(phases, events[1:]):
                        phase()
                        event.record()
                    host[c].append(time.perf_counter() - start)
                    pending.append((c, events))
                    continue
                stamps = [time.perf_counter()]
                for phase in phases:
                    phase()
                    stamps.append(time.perf_counter())
                for i in range(len(phases)):
                    samples[c][i].append(stamps[i + 1] - stamps[i])
        if pending:
            torch.cuda.synchronize(self.device)
            for c, events in pending:
                for i in range(len(events) - 1):
                    samples[c][i].append(events[i].elapsed_time(events[i + 1]) / 1e3)
            for c, phases in enumerate(candidates):  # single-phase rounds: record() reports their host time
                if len(phases) == 1:
                    self.host_times[id(samples[c][0])] = (samples[c][0], host[c])
        return samples

    def _measure_back_to_back(self, candidates: Sequence[Sequence[Callable[[], Any]]]) -> list[list[list[float]]]:
        """`measure` as DeepEP's tests time (TIMING): bursts of back-to-back calls, an event pair around each."""
        samples: list[list[list[float]]] = [[[] for _ in phases] for phases in candidates]
        for first in range(0, self.cfg.iters, BURST):
            for c, phases in enumerate(candidates):
                self.barrier()
                rounds = []
                for _ in range(min(BURST, self.cfg.iters - first) + 1):
                    events = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
                    events[0].record()
                    for phase, event in zip(phases, events[1:]):
                        phase()
                        event.record()
                    rounds.append(events)
                torch.cuda.synchronize(self.device)
                for events in rounds[1:]:  # the first started from an idle device
                    for i in range(len(phases)):
                        samples[c][i].append(events[i].elapsed_time(events[i + 1]) / 1e3)
        return samples

    def record(
        self,
        impl: str,
        mode: str,
        op: str,
        dtype: str,
        tokens: int,
        times: list[float],
        acct: tuple[int, int] | None,
        wire: int | None = None,
        announce: bool = True,
    ) -> None:
        """Keep one measurement: seconds per round, this rank's (bytes, cross bytes) by DeepEP's accounting, and
        the bytes its all_to_all_single calls sent to other ranks (None: not through torch.distributed)."""
        self.records.append(
            {
                "impl": impl,
                "mode": mode,
                "op": op,
                "dtype": dtype,
                "tokens": tokens,
                "times": times,
                "bytes": None if acct is None else acct[0],
                "cross_bytes": None if acct is None else acct[1],
                "wire_bytes": wire,
                "host_times": self.host_seconds(times),
            }
        )
        if not announce:
            return
        self.step += 1
        if self.cfg.progress and self.rank == 0:
            total = self.cfg.num_steps(self.device.type == "cuda", self.impl.ll_op_alone_capturable)
            print(
                f"[{self.step:>3}/{total}] {impl:<24} {mode:<6} {op:<22} {dtype:<8} tokens={tokens:<6} "
                f"rank-0 median {statistics.median(times) * 1e3:9.3f} ms"
                + (f" (host {statistics.median(host) * 1e3:.3f} ms)" if (host := self.host_seconds(times)) else ""),
                file=sys.stderr,
                flush=True,
            )

    def host_seconds(self, times: list[float]) -> list[float] | None:
        """GPU: the host's seconds per round of the measurement that produced `times` (issuing the calls; the
        device time is `times`), or None."""
        entry = self.host_times.get(id(times))
        return entry[1] if entry is not None and entry[0] is times else None

    def wire_bytes(self, fn: Callable[[], Any]) -> int | None:
        """Bytes that one call of fn sends to other ranks through torch.distributed's all-to-alls (the single
        tensor form and the list form; every rank calls this together). None when fn makes no such call (e.g.
        DeepEP's own NVLink kernels)."""
        original_single, original_list = dist.all_to_all_single, dist.all_to_all
        rank, world = self.rank, self.world
        sent: list[int] = []

        def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            rows = input.shape[0] if input.dim() else 0
            row_bytes = input.numel() * input.element_size() // rows if rows else 0
            splits = list(input_split_sizes) if input_split_sizes else [rows // world] * world
            sent.append(sum(int(s) for d, s in enumerate(splits) if d != rank) * row_bytes)
            return original_single(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        def counting_list(outputs, inputs, group=None, async_op=False):
            sent.append(sum(t.numel() * t.element_size() for d, t in enumerate(inputs) if d != rank))
            return original_list(outputs, inputs, group=group, async_op=async_op)

        self.barrier()
        dist.all_to_all_single, dist.all_to_all = counting, counting_list
        try:
            fn()
            self._sync()
        finally:
            dist.all_to_all_single, dist.all_to_all = original_single, original_list
        return sum(sent) if sent else None

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of ints: [rank][i]."""
        local = torch.tensor(values, dtype=torch.int64, device=self.device)
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local, group=self.group)
        return [t.tolist() for t in out]

    def capture(self, phases: Sequence[Callable[[], Any]]) -> Callable[[], None]:
        """The phases captured in one CUDA graph (after a warm-up on a side stream); returns its replay.

        What a decode step that captures its MoE layers runs: no host work per call, only the device's."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for phase in phases:
                phase()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for phase in phases:
                phase()
        self._graphs = getattr(self, "_graphs", []) + [graph]  # keep it (and its memory) alive
        return graph.replay

    def kernel_times(self, ops: dict[str, Callable[[], Any]], label: str) -> dict[str, list[float]]:
        """KERNEL_TIMES on rank 0 (the others make the same calls unprofiled; every rank starting CUPTI while
        its peers' kernels wait on it hung in the first try): per op, the seconds of device work of each of
        KERNEL_CALLS calls (ops alternate), and a per-kernel table kept with the profiles."""
        for fn in ops.values():  # warm-up, outside the profiler
            fn()
        self.barrier()
        marks = {op: f"deep_ep_bench.kernels.{op}" for op in ops}
        if self.rank != 0:
            for _ in range(KERNEL_CALLS):
                for fn in ops.values():
                    fn()
            self._sync()
            return {}
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(KERNEL_CALLS):
                for op, fn in ops.items():
                    with torch.profiler.record_function(marks[op]):
                        fn()
            self._sync()
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
            with open(os.path.join(tmp, "trace.json")) as f:
                per_call = device_time_per_range(json.load(f))
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=20, max_name_column_width=70)
        self.profiles.append(f"== {label}: kernels of {KERNEL_CALLS} calls of each of {list(ops)} (rank 0) ==\n{table}")
        return {op: [us / 1e6 for us in per_call.get(mark, [])] for op, mark in marks.items()}

    def raw_a2a(self, send_rows: int, recv_rows: int, row_bytes: int, in_splits: list[int], out_splits: list[int]):
        send = torch.empty(send_rows, row_bytes, dtype=torch.uint8, device=self.device)
        recv = torch.empty(recv_rows, row_bytes, dtype=torch.uint8, device=self.device)
        group = self.group
        return lambda: dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)

    def profile(self, label: str, fn: Callable[[], Any]) -> None:
        """`profile_calls` calls of fn on every rank; rank 0 records them with torch.profiler and keeps the
        summary tables (top ops by device time on GPUs, by self CPU time everywhere)."""
        calls = self.cfg.profile_calls
        host_calls = 20  # then under cProfile: where the host's issuing time goes, by Python function
        self.barrier()
        if self.rank != 0:
            for _ in range(calls + host_calls):
                fn()
            self._sync()
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                with torch.profiler.record_function(CALL_MARK):
                    fn()
            self._sync()
            wall = (time.perf_counter() - start) * 1e3 / calls
        averages = prof.key_averages()
        parts = [f"== {label} (rank 0, {calls} call(s), {wall:.3f} ms wall per call under the profiler) =="]
        if self.device.type == "cuda":
            with tempfile.TemporaryDirectory() as tmp:
                prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
                with open(os.path.join(tmp, "trace.json")) as f:
                    parts.append(timeline(json.load(f)))
            parts.append("-- top ops by device (CUDA) time --")
            parts.append(averages.table(sort_by="device_time_total", row_limit=25, max_name_column_width=70))
        parts.append("-- top ops by self CPU time --")
        parts.append(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
        host = cProfile.Profile()
        host.enable()
        for _ in range(host_calls):
            fn()
        host.disable()
        self._sync()
        listing = io.StringIO()
        pstats.Stats(host, stream=listing).sort_stats("tottime").print_stats(30)
        parts.append(f"-- host Python profile (cProfile, {host_calls} calls, by own time) --")
        parts.append(listing.getvalue().strip())
        self.profiles.append("\n".join(parts))

    # -- the runs --
    def run(self) -> dict:
        cfg = self.cfg
        if "normal" in cfg.modes:
            if cfg.num_sms is not None:  # DeepEP's knob: the default Config's SM budget
                self.impl.module().Buffer.set_num_sms(cfg.num_sms)
            buffer = self.impl.normal_buffer(self.group, cfg.hidden, self.world)
            self.label = self.impl.label(buffer) + ("" if cfg.num_sms is None else f" num_sms={cfg.num_sms}")
            for n in cfg.tokens:
                self.normal(buffer, n, profile=cfg.profile and n == max(cfg.tokens))
            del buffer
        if "ll" in cfg.modes:
            buffer = self.impl.ll_buffer(self.group, max(cfg.ll_tokens), cfg.hidden, self.world, cfg.experts)
            self.label = self.impl.label(buffer)
            for t in cfg.ll_tokens:
                self.low_latency(buffer, t, profile=cfg.profile and t == max(cfg.ll_tokens))
            del buffer
        self.barrier()
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor()
        return {
            "rank": self.rank,
            "records": self.records,
            "profiles": self.profiles,
            "device": str(self.device.type),
            "device_name": device_name or platform.machine(),
        }

    def _inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        topk_idx, weights = make_routing(self.rank, n, cfg.experts, cfg.topk, seed=cfg.seed, drop=cfg.drop)
        x = make_x(self.rank, n, cfg.hidden, seed=cfg.seed)
        return (
            x.to(self.device),
            topk_idx.to(device=self.device, dtype=self.impl.index_dtype),
            weights.to(self.device),
        )

    def normal(self, buffer: Any, n: int, profile: bool) -> None:
        cfg, rank, label = self.cfg, self.rank, self.label
        x, topk_idx, weights = self._inputs(n)
        experts = cfg.experts
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
        ((times,),) = self.measure([lambda: buffer.get_dispatch_layout(topk_idx, experts)])
        self.record(label, "normal", "layout", "-", n, times, None)

        counts = self.gather_ints(per_rank.tolist())  # [source][destination] tokens
        send_splits = counts[rank]
        recv_splits = [counts[s][rank] for s in range(self.world)]
        recv_rows, self_rows = sum(recv_splits), counts[rank][rank]
        layout = {
            "num_tokens_per_rank": per_rank,
            "num_tokens_per_rdma_rank": per_rdma,
            "is_token_in_rank": in_rank,
            "num_tokens_per_expert": per_expert,
            "topk_idx": topk_idx,
            "topk_weights": weights,
        }
        combine_input = None
        for dtype in cfg.dtypes:
            xd = x if dtype == "bfloat16" else per_token_cast_to_fp8(x)
            recv_x, _, _, _, handle, _ = buffer.dispatch(xd, **layout)
            got = (recv_x[0] if isinstance(recv_x, tuple) else recv_x).shape[0]
            if got != recv_rows:
                raise RuntimeError(f"rank {rank}: dispatch returned {got} rows, the layout says {recv_rows}")
            if dtype == "bfloat16":
                combine_input = (recv_x, handle)
            row = normal_row_bytes(cfg.hidden, dtype)
            acct = (recv_rows * row, (recv_rows - self_rows) * row)

            def fresh(xd: Any = xd) -> Any:
                return buffer.dispatch(xd, **layout)

            def cached(xd: Any = xd, handle: Any = handle) -> Any:
                return buffer.dispatch(xd, handle=handle)

            raw = self.raw_a2a(sum(send_splits), recv_rows, row, send_splits, recv_splits)
            runs = (("dispatch", fresh, label), ("dispatch_cached", cached, label), ("dispatch", raw, RAW))
            wires = [self.wire_bytes(fn) for _, fn, _ in runs]
            samples = self.measure(*[[fn] for _, fn, _ in runs])
            for (name, _, impl), wire, (times,) in zip(runs, wires, samples):
                self.record(impl, "normal", name, dtype, n, times, acct, wire)
        if combine_input is None:
            recv_x, _, _, _, handle, _ = buffer.dispatch(x, **layout)
            combine_input = (recv_x, handle)
        recv_x, handle = combine_input
        row = cfg.hidden * 2
        acct = (recv_rows * row, (recv_rows - self_rows) * row)
        raw = self.raw_a2a(recv_rows, sum(send_splits), row, recv_splits, send_splits)
        runs = ((lambda: buffer.combine(recv_x, handle), label), (raw, RAW))
        wires = [self.wire_bytes(fn) for fn, _ in runs]
        samples = self.measure(*[[fn] for fn, _ in runs])
        for (_, impl), wire, (times,) in zip(runs, wires, samples):
            self.record(impl, "normal", "combine", "bfloat16", n, times, acct, wire)
        if profile:
            dtype = cfg.dtypes[0]
            xd = x if dtype == "bfloat16" else per_token_cast_to_fp8(x)
            self.profile(f"{label} normal dispatch {dtype} tokens={n}", lambda: buffer.dispatch(xd, **layout))
            self.profile(
                f"{label} normal cached dispatch {dtype} tokens={n}", lambda: buffer.dispatch(xd, handle=handle)
            )
            self.profile(f"{label} normal combine bfloat16 tokens={n}", lambda: buffer.combine(recv_x, handle))

    def low_latency(self, buffer: Any, t: int, profile: bool) -> None:
        cfg, rank, label = self.cfg, self.rank, self.label
        experts, hidden = cfg.experts, cfg.hidden
        local_experts = experts // self.world
        buffer.clean_low_latency_buffer(t, hidden, experts)
        x, topk_idx, weights = self._inputs(t)
        # The expert outputs to combine, [L, R*T, H] (hundreds of MB at DeepEP's shapes): made on the device.
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1_000_003 + rank * 10_007 + t + 2)
        y = torch.randn(local_experts, self.world * t, hidden, generator=gen, device=self.device, dtype=torch.bfloat16)
        valid = topk_idx.cpu() >= 0
        dest = torch.where(valid, topk_idx.cpu() // local_experts, -1)
        send_splits = [int((dest == d).sum()) for d in range(self.world)]  # one message per selection
        recv_splits = [row[rank] for row in self.gather_ints(send_splits)]
        selections, self_selections = sum(send_splits), send_splits[rank]
        state: dict[str, Any] = {}
        for dtype in cfg.dtypes:
            use_fp8 = dtype == "fp8"

            def dispatch(use_fp8: bool = use_fp8) -> None:
                state["out"] = buffer.low_latency_dispatch(x, topk_idx, t, experts, use_fp8=use_fp8)

            def combine() -> None:
                buffer.low_latency_combine(y, topk_idx, weights, state["out"][2])

            msg, back = ll_message_bytes(hidden, dtype), hidden * 2
            d_acct = (selections * msg, (selections - self_selections) * msg)
            c_acct = (selections * back, (selections - self_selections) * back)
            pair_acct = (d_acct[0] + c_acct[0], d_acct[1] + c_acct[1])
            raw_dispatch = self.raw_a2a(selections, sum(recv_splits), msg, send_splits, recv_splits)
            raw_combine = self.raw_a2a(sum(recv_splits), selections, back, recv_splits, send_splits)
            runs = ((label, (dispatch, combine)), (RAW, (raw_dispatch, raw_combine)))
            wires = []
            for impl, phases in runs:
                d_wire = self.wire_bytes(phases[0])
                if impl == label:
                    got = int(state["out"][1].sum())
                    if got != sum(recv_splits):
                        raise RuntimeError(
                            f"rank {rank}: low_latency_dispatch received {got} messages, not {recv_splits}"
                        )
                wires.append((d_wire, self.wire_bytes(phases[1])))
            samples = self.measure(*[phases for _, phases in runs])
            for (impl, _), (d_wire, c_wire), (d_times, c_times) in zip(runs, wires, samples):
                pair_wire = None if d_wire is None and c_wire is None else (d_wire or 0) + (c_wire or 0)
                pair = [a + b for a, b in zip(d_times, c_times)]
                self.record(impl, "ll", "dispatch", dtype, t, d_times, d_acct, d_wire, announce=False)
                self.record(impl, "ll", "combine", dtype, t, c_times, c_acct, c_wire, announce=False)
                self.record(impl, "ll", "dispatch+combine", dtype, t, pair, pair_acct, pair_wire)
            if self.device.type != "cuda":
                continue
            alone = self.impl.ll_op_alone_capturable
            replays = {}
            if cfg.ll_graph or (cfg.ll_kernel_times and alone):
                wanted = {"dispatch+combine": (dispatch, combine)} if cfg.ll_graph else {}
                if alone:
                    wanted.update({"dispatch": (dispatch,), "combine": (combine,)})
                for op, phases in wanted.items():
                    try:
                        replays[op] = self.capture(phases)
                    except Exception as error:  # a failed capture loses this figure only, not the run
                        print(f"rank {rank}: {label} {op} could not be captured in a CUDA graph: {error!r}", flush=True)
                        torch.cuda.synchronize(self.device)
            accts = {"dispatch": d_acct, "combine": c_acct, "dispatch+combine": pair_acct}
            if cfg.ll_graph:
                for op, replay in replays.items():
                    (times,) = self.measure((replay,))[0]
                    self.record(label, "ll", f"graph {op}", dtype, t, times, accts[op], None)
            if cfg.ll_kernel_times:
                ops = {"dispatch": dispatch, "combine": combine}
                if alone and "dispatch" in replays and "combine" in replays:
                    ops = {op: replays[op] for op in ops}
                kernel_label = f"{label} low-latency {dtype} T={t}"
                for op, times in self.kernel_times(ops, kernel_label).items():
                    self.record(label, "ll", f"kernels {op}", dtype, t, times, accts[op], None)
        if profile:
            dtype = "fp8" if "fp8" in cfg.dtypes else cfg.dtypes[0]
            use_fp8 = dtype == "fp8"
            self.profile(
                f"{label} low-latency dispatch {dtype} T={t}",
                lambda: state.__setitem__("out", buffer.low_latency_dispatch(x, topk_idx, t, experts, use_fp8=use_fp8)),
            )
            self.profile(
                f"{label} low-latency combine bfloat16 T={t}",
                lambda: buffer.low_latency_combine(y, topk_idx, weights, state["out"][2]),
            )


def _worker(rank: int, world: int, cfg: BenchConfig, impl: Impl) -> dict:
    return RankBench(rank, world, cfg, impl).run()


# ---- launchers ---------------------------------------------------------------------------------------
def _spawn_main(
    rank: int, world: int, store_path: str, backend: str, timeout: float, conn: Any, fn: Callable, args: tuple
) -> None:
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        else:
            torch.set_num_threads(1)  # the ranks share the host's cores (as deep_ep.testing.run_ranks does)
        store = dist.FileStore(store_path, world)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
        )
        conn.send(("ok", fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def spawn_ranks(world: int, fn: Callable, args: tuple, *, backend: str = "gloo", timeout: float = 3600.0) -> list:
    """fn(rank, world, *args) on `world` spawned processes (FileStore rendezvous); results by rank.

    Needs nothing from this repository's package, so the upstream DeepEP program can use it.
    """
    ctx = multiprocessing.get_context("spawn")
    workdir = tempfile.mkdtemp(prefix="deep_ep_bench_")
    procs, conns = [], []
    try:
        for rank in range(world):
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_spawn_main,
                args=(rank, world, os.path.join(workdir, "store"), backend, timeout, child_end, fn, args),
                daemon=True,
            )
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
        deadline = time.monotonic() + timeout
        results: dict[int, tuple[str, Any]] = {}
        waiting = dict(enumerate(conns))
        while waiting and time.monotonic() < deadline:
            for conn in multiprocessing.connection.wait(list(waiting.values()), timeout=1.0):
                rank = next(r for r, c in waiting.items() if c is conn)
                try:
                    results[rank] = conn.recv()
                except EOFError:
                    procs[rank].join(timeout=1)
                    results[rank] = ("error", f"exited with code {procs[rank].exitcode} before reporting")
                del waiting[rank]
            if any(status == "error" for status, _ in results.values()):
                deadline = min(deadline, time.monotonic() + 10.0)
        failures = [f"[rank {r}] {body}" for r, (status, body) in sorted(results.items()) if status == "error"]
        missing = sorted(set(range(world)) - set(results))
        if missing:
            failures.append(f"ranks {missing} did not finish within {timeout:g} s")
        if failures:
            raise RuntimeError("\n".join(failures))
        return [results[r][1] for r in range(world)]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)


def run_torchrun(fn: Callable, args: tuple, backend: str) -> list | None:
    """Inside a torchrun process: init from the environment, run fn, gather results on rank 0 (others: None)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, result)
        return gathered if rank == 0 else None
    finally:
        dist.destroy_process_group()


# ---- aggregation and reports -------------------------------------------------------------------------
def device_time_per_range(trace: dict) -> dict[str, list[float]]:
    """For each host range (user annotation) of a torch.profiler Chrome trace, in order: the summed durations
    (us) of the GPU operations issued from inside it (matched by the issuing call's correlation id; a CUDA graph's
    kernels carry the correlation of its launch)."""
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    issued = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    ranges = sorted((e for e in events if e.get("cat") == "user_annotation"), key=lambda e: e["ts"])
    totals = [0.0] * len(ranges)
    starts = [r["ts"] for r in ranges]
    for e in events:
        if e.get("cat") not in GPU_TRACE_CATEGORIES:
            continue
        at = issued.get(e.get("args", {}).get("correlation"))
        if at is None:
            continue
        i = bisect.bisect_right(starts, at) - 1  # the last range starting at or before the issue
        if i >= 0 and at <= ranges[i]["ts"] + ranges[i]["dur"]:
            totals[i] += e["dur"]
    out: dict[str, list[float]] = {}
    for r, total in zip(ranges, totals):
        out.setdefault(r["name"], []).append(total)
    return out


def timeline(trace: dict) -> str:
    """Per profiled call (a CALL_MARK range in a torch.profiler Chrome trace): how long the host took to issue
    it, when its first GPU operation started relative to the call's start, how long its GPU operations span
    and how much of that span the GPU was busy, and each operation's start and duration in order. An operation
    counts for the call whose host range issued it (by correlation id), wherever it ran on the device."""
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    marks = sorted(
        (e for e in events if e.get("name") == CALL_MARK and e.get("cat") == "user_annotation"), key=lambda e: e["ts"]
    )
    ops = sorted((e for e in events if e.get("cat") in GPU_TRACE_CATEGORIES), key=lambda e: e["ts"])
    # The host call (cudaLaunchKernel, cudaMemcpyAsync, ...) that issued each GPU op, by correlation id.
    issued = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    lines = [
        "-- timeline per call (us from the call's start: issued by the host, started on the GPU, duration; "
        "the profiler adds its own host overhead) --"
    ]
    for i, mark in enumerate(marks):
        begin = mark["ts"]
        end = marks[i + 1]["ts"] if i + 1 < len(marks) else float("inf")
        # An op belongs to the call that issued it; calls are not synchronised, so a device that lags the host
        # starts one call's ops after the next call began. The device start decides only where no issue is known.
        mine = [e for e in ops if begin <= issued.get(e.get("args", {}).get("correlation"), e["ts"]) < end]
        if not mine:
            lines.append(f"call {i}: host {mark['dur']:.0f} us, no GPU operation")
            continue
        busy, reach = 0.0, mine[0]["ts"]
        for e in mine:  # union of the operations' intervals
            busy += max(0.0, e["ts"] + e["dur"] - max(reach, e["ts"]))
            reach = max(reach, e["ts"] + e["dur"])
        span = reach - mine[0]["ts"]
        lines.append(
            f"call {i}: host {mark['dur']:.0f} us; first GPU op at +{mine[0]['ts'] - begin:.0f}; GPU span "
            f"{span:.0f} us, busy {busy:.0f} us (idle {span - busy:.0f}); done at +{reach - begin:.0f}"
        )
        for e in mine:
            at = issued.get(e.get("args", {}).get("correlation"))
            host = "" if at is None else f"{at - begin:+.0f}"
            lines.append(f"    {host:>9} {e['ts'] - begin:+9.0f} {e['dur']:8.1f}  {e['name'][:90]}")
    return "\n".join(lines)


def aggregate(per_rank: list[dict]) -> list[dict]:
    """Per-rank samples -> one record per (impl, mode, op, dtype, tokens), with ratios to the raw a2a."""
    grouped: dict[tuple, list[dict]] = {}
    for result in per_rank:
        for rec in result["records"]:
            key = (rec["impl"], rec["mode"], rec["op"], rec["dtype"], rec["tokens"])
            grouped.setdefault(key, []).append(rec)
    records = []
    for (impl, mode, op, dtype, tokens), recs in grouped.items():
        # Kernel times are taken on rank 0 only; their bytes are every rank's, from the op's own records.
        counted = grouped.get((impl, mode, op.removeprefix("kernels "), dtype, tokens), recs)
        medians = [statistics.median(r["times"]) for r in recs]
        time_s = max(medians)
        out = {
            "impl": impl,
            "mode": mode,
            "op": op,
            "dtype": dtype,
            "tokens": tokens,
            "time_ms": time_s * 1e3,
            "time_ms_rank_medians": [m * 1e3 for m in medians],
            "samples_ms_rank0": [s * 1e3 for s in recs[0]["times"]],
            "bytes_per_rank": None,
            "bytes_each_rank": None,
            "cross_bytes_per_rank": None,
            "cross_bytes_each_rank": None,
            "wire_cross_bytes_per_rank": None,
            "wire_cross_bytes_each_rank": None,
            "gbps": None,
            "cross_gbps": None,
            "raw_a2a_ms": None,
            "ratio_to_raw_a2a": None,
            **host_figures(recs),
        }
        if counted[0]["bytes"] is not None:
            each = [r["bytes"] for r in counted]
            cross = [r["cross_bytes"] for r in counted]
            out.update(
                bytes_per_rank=sum(each) / len(each),
                bytes_each_rank=each,
                cross_bytes_per_rank=sum(cross) / len(cross),
                cross_bytes_each_rank=cross,
                gbps=_gbps(sum(each) / len(each), time_s),
                cross_gbps=_gbps(sum(cross) / len(cross), time_s),
            )
        wire = [r.get("wire_bytes") for r in recs]
        if all(w is not None for w in wire):
            out.update(wire_cross_bytes_per_rank=sum(wire) / len(wire), wire_cross_bytes_each_rank=wire)
        records.append(out)
    records = with_round_trips(records)
    link_baselines(records)
    return records


def host_figures(recs: list[dict]) -> dict:
    """GPU idle timing: the host's seconds to issue each call (kept per rank by `measure`), reduced as the device
    times are: per-rank medians and their max, in ms. None where any rank has none (CPU, back-to-back, graphs)."""
    host = [r.get("host_times") for r in recs]
    if not host or not all(host):
        return {"host_ms": None, "host_ms_rank_medians": None}
    medians = [statistics.median(h) * 1e3 for h in host]
    return {"host_ms": max(medians), "host_ms_rank_medians": medians}


ROUND_TRIP = "dispatch_cached+combine"


def with_round_trips(records: list[dict]) -> list[dict]:
    """records plus, after each normal-mode combine, a 'dispatch_cached+combine' record per dispatch dtype: the
    cached dispatch's and the combine's figures summed (the raw baseline's from its dispatch and combine), as
    issue 7's target and DeepEP's tuning add the two separately timed ops. Bytes, samples and per-rank figures
    are summed alike."""
    by_key = {(r["impl"], r.get("program"), r["mode"], r["op"], r["dtype"], r["tokens"]): r for r in records}
    out = []
    for rec in records:
        out.append(rec)
        if rec["mode"] != "normal" or rec["op"] != "combine":
            continue
        dispatch_op = "dispatch" if rec["impl"] == RAW else "dispatch_cached"
        for dtype in DTYPES:
            first = by_key.get((rec["impl"], rec.get("program"), "normal", dispatch_op, dtype, rec["tokens"]))
            if first is not None:
                out.append(_summed(first, rec))
    return out


def _summed(a: dict, b: dict) -> dict:
    def add(key: str) -> Any:
        x, y = a[key], b[key]
        if x is None or y is None:
            return None
        return [u + v for u, v in zip(x, y)] if isinstance(x, list) else x + y

    out = dict(a, op=ROUND_TRIP, raw_a2a_ms=None, ratio_to_raw_a2a=None)
    for key in ("time_ms", "time_ms_rank_medians", "samples_ms_rank0", "bytes_per_rank", "bytes_each_rank",
                "cross_bytes_per_rank", "cross_bytes_each_rank", "wire_cross_bytes_per_rank",
                "wire_cross_bytes_each_rank", "host_ms", "host_ms_rank_medians"):  # fmt: skip
        out[key] = add(key)
    seconds = out["time_ms"] / 1e3
    out["gbps"] = _gbps(out["bytes_per_rank"], seconds)
    out["cross_gbps"] = _gbps(out["cross_bytes_per_rank"], seconds)
    return out


def _gbps(nbytes: float | None, seconds: float) -> float | None:
    """GB/s (1e9 bytes/s): 0.0 for no bytes (nothing routed, one rank's cross bytes), None without a count."""
    return None if nbytes is None or seconds <= 0 else nbytes / seconds / 1e9


def _baseline_key(rec: dict) -> tuple | None:
    if rec["op"] == "layout":
        return None
    op = "dispatch" if rec["op"] == "dispatch_cached" else rec["op"]
    return (rec["mode"], op, rec["dtype"], rec["tokens"])


def link_baselines(records: list[dict]) -> None:
    """Fill raw_a2a_ms / ratio_to_raw_a2a of each record from the raw a2a record of the same workload."""
    raw = {_baseline_key(r): r for r in records if r["impl"] == RAW}
    for rec in records:
        base = raw.get(_baseline_key(rec))
        if base is not None and base["time_ms"] > 0:
            rec["raw_a2a_ms"] = base["time_ms"]
            rec["ratio_to_raw_a2a"] = rec["time_ms"] / base["time_ms"]


def machine_info(per_rank: list[dict], cfg: BenchConfig) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "dist_backend": cfg.dist_backend,
        "ranks": len(per_rank),
        "device": per_rank[0].get("device"),
        "device_name": per_rank[0].get("device_name"),
    }
    return info


def build_report(per_rank: list[dict], cfg: BenchConfig, impl: Impl, program: str, argv: list[str]) -> dict:
    config = asdict(cfg)
    config.pop("progress")
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "program": program,
        "command": " ".join([program, *argv]),
        "impl": impl.metadata(),
        "machine": machine_info(per_rank, cfg),
        "config": config,
        "timing": TIMING,
        "kernel_times": KERNEL_TIMES,
        "byte_accounting": BYTE_ACCOUNTING,
        "records": [dict(r, program=program) for r in aggregate(per_rank)],
        "profile": "\n\n".join(p for result in per_rank for p in result.get("profiles", [])) or None,
    }


def merge_reports(reports: list[dict]) -> dict:
    """Several reports (e.g. ours and upstream DeepEP) in one: every record, each source's metadata."""
    for report in reports:
        if report.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} report: schema={report.get('schema')!r}")
    sources: list[dict] = []
    records: list[dict] = []
    for report in reports:  # a merged report brings its own sources; each record keeps the index of its source
        offset = len(sources)
        sources += report.get("sources") or [
            {k: v for k, v in report.items() if k not in ("records", "profile", "sources")}
        ]
        records += [dict(rec, source=rec.get("source", 0) + offset) for rec in report["records"]]
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "program": "merge",
        "sources": sources,
        "timing": TIMING,
        "kernel_times": KERNEL_TIMES,
        "byte_accounting": BYTE_ACCOUNTING,
        "records": records,
        "profile": "\n\n".join(r["profile"] for r in reports if r.get("profile")) or None,
    }


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _column(rec: dict) -> tuple[str, str, int]:
    """A record's column group: its implementation, program and (in a merge) source report."""
    return rec["impl"], rec.get("program", ""), rec.get("source", 0)


def _columns(records: list[dict]) -> list[tuple[str, str, int]]:
    """Column groups: raw baselines first, in order of appearance (each merged report's own)."""
    seen: list[tuple[str, str, int]] = []
    for rec in records:
        if _column(rec) not in seen:
            seen.append(_column(rec))
    return sorted(seen, key=lambda k: k[0] != RAW)


def _column_names(groups: list[tuple[str, str, int]]) -> list[str]:
    """Implementation names, with the program where several programs merged and the source report where one
    implementation of one program came from several."""
    programs = {p for _, p, _ in groups}
    repeated = {(i, p) for i, p, _ in groups if sum((i, p) == (j, q) for j, q, _ in groups) > 1}
    names = []
    for impl, prog, src in groups:
        program = f" [{prog}]" if len(programs) > 1 else ""
        names.append(impl + program + (f" (report {src + 1})" if (impl, prog) in repeated else ""))
    return names


def format_table(report: dict, markdown: bool = False) -> str:
    """The results as text (or a Markdown table): one row per workload, one column group per implementation."""
    records = report["records"]
    groups = _columns(records)
    names = _column_names(groups)
    letters = [chr(ord("A") + i) for i in range(len(groups))]
    rows: dict[tuple, dict] = {}
    for rec in records:
        rows.setdefault((rec["mode"], rec["op"], rec["dtype"], rec["tokens"]), {})[_column(rec)] = rec
    header = ["mode", "op", "dtype", "tokens", "bytes/rank", "cross/rank"]
    for letter, (impl, _, _) in zip(letters, groups):
        header += [f"{letter} ms", f"{letter} GB/s"] + ([] if impl == RAW else [f"{letter}/raw", f"{letter} wire"])
    table = [header]
    differing = False
    for (mode, op, dtype, tokens), by_impl in rows.items():
        first = next(iter(by_impl.values()))
        same = len({(r["bytes_per_rank"], r["cross_bytes_per_rank"]) for r in by_impl.values()}) == 1
        differing |= not same
        line = [
            mode,
            op,
            dtype,
            str(tokens),
            _fmt_bytes(first["bytes_per_rank"]) + ("" if same else "*"),
            _fmt_bytes(first["cross_bytes_per_rank"]) + ("" if same else "*"),
        ]
        for impl, prog, src in groups:
            rec = by_impl.get((impl, prog, src))
            cells = ["-", "-"] if impl == RAW else ["-", "-", "-", "-"]
            if rec is not None:
                cells[0] = f"{rec['time_ms']:.3f}"
                cells[1] = "-" if rec["gbps"] is None else f"{rec['gbps']:.2f}"
                if impl != RAW:
                    cells[2] = "-" if rec["ratio_to_raw_a2a"] is None else f"{rec['ratio_to_raw_a2a']:.2f}x"
                    cells[3] = _fmt_bytes(rec.get("wire_cross_bytes_per_rank"))
            line += cells
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    text = []
    for i, r in enumerate(table):
        if markdown:
            text.append("| " + " | ".join(r) + " |")
            if i == 0:
                text.append("|" + "|".join("---" if j < 3 else "---:" for j in range(len(r))) + "|")
            continue
        text.append("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            text.append("-" * len(text[0]))
    legend = [f"{letter} = {name}" for letter, name in zip(letters, names)]
    heading = _describe(report)
    if markdown:  # one list item per source and the legend: plain lines would run into one paragraph
        heading = [f"- {line}" for line in heading + [", ".join(legend)]]
        legend = []
    notes = (
        "bytes/rank: DeepEP's accounting (received rows incl. own rank; LL: selections x message bytes), mean over "
        "ranks; cross/rank: the part between different ranks; ms: max over ranks of the per-rank median; "
        "X/raw: time / the raw all_to_all_single of the same payload in the same process; X wire: bytes X's own "
        "all-to-all calls sent to other ranks per rank ('-': not through torch.distributed)."
    )
    if differing:
        star = "\\*" if markdown else "*"  # a bare '*' would open a Markdown list item and vanish
        notes += f"\n{star} the implementations moved different byte counts here (different workloads?); first shown."
    return "\n".join(heading + legend + [""] + text + ["", notes])


def _describe(report: dict) -> list[str]:
    sources = report.get("sources") or [report]
    lines = []
    for src in sources:
        cfg, machine, impl = src.get("config", {}), src.get("machine", {}), src.get("impl", {})
        host_sum = f"; host ordered sum: {impl['host_ordered_sum']}" if "host_ordered_sum" in impl else ""
        lines.append(
            f"{src.get('program', '?')}: ranks={machine.get('ranks')} {machine.get('dist_backend')} on "
            f"{machine.get('device')} ({machine.get('device_name')}), torch {machine.get('torch')}; hidden="
            f"{cfg.get('hidden')} top-{cfg.get('topk')} of {cfg.get('experts')} experts, drop={cfg.get('drop')}, "
            f"iters={cfg.get('iters')} warmup={cfg.get('warmup')} seed={cfg.get('seed')}, "
            f"timing={cfg.get('timing', 'idle')}{host_sum}"
        )
    return lines


def plot(report: dict, path: str) -> str:
    """PNG: bandwidth (normal mode) and latency (low-latency mode) against tokens per rank. Returns a message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib, or pip install -e '.[bench]')"
    records = report["records"]
    panels = [
        ("normal", ("dispatch", "dispatch_cached"), "gbps", "normal dispatch: GB/s (DeepEP bytes)"),
        ("normal", ("combine",), "gbps", "normal combine: GB/s (DeepEP bytes)"),
        ("ll", ("dispatch", "combine"), "time_us", "low-latency dispatch / combine: latency (us)"),
        ("ll", ("dispatch+combine",), "time_us", "low-latency dispatch + combine: latency (us)"),
    ]
    panels = [p for p in panels if any(r["mode"] == p[0] and r["op"] in p[1] for r in records)]
    if not panels:
        return "no plot: no records"
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.5 * rows), squeeze=False)
    groups = _columns(records)
    names = _column_names(groups)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (mode, ops, metric, title) in zip(axes.flat, panels):
        for gi, (impl, prog, src) in enumerate(groups):
            for op in ops:
                for dtype in DTYPES:
                    pts = sorted(
                        (r["tokens"], r["gbps"] if metric == "gbps" else r["time_ms"] * 1e3)
                        for r in records
                        if r["mode"] == mode
                        and r["op"] == op
                        and r["dtype"] == dtype
                        and _column(r) == (impl, prog, src)
                    )
                    pts = [p for p in pts if p[1] is not None]
                    if not pts:
                        continue
                    # Line style: the op (raw baselines dashed); marker: the dtype; colour: the implementation.
                    if impl == RAW:
                        style: Any = (0, (3, 1, 1, 1)) if op == "combine" else "--"
                    else:
                        style = {"dispatch_cached": ":", "combine": "-."}.get(op, "-")
                    marker = "o" if dtype == "bfloat16" else "s"
                    name = names[gi]
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        linestyle=style,
                        marker=marker,
                        color=colors[gi % len(colors)],
                        label=f"{name} {op} {dtype}",
                    )
        ax.set_xscale("log", base=2)
        if metric == "time_us":  # latencies of different implementations span orders of magnitude
            ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("\n".join(_describe(report)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


# ---- command line ----------------------------------------------------------------------------------
def _int_list(values: list[str]) -> list[int]:
    """The sizes given (space- or comma-separated), each once, in order: a repeated size would pool two runs."""
    out = []
    for value in values:
        out += [int(v) for v in value.split(",") if v]
    return list(dict.fromkeys(out))


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", nargs="+", default=["512"], help="tokens per rank (normal mode), a sweep")
    parser.add_argument("--ll-tokens", nargs="+", default=None, help="T for low-latency mode (default: --tokens)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=2, help="group size (local launcher)")
    parser.add_argument("--backend", default="auto", help="deep_ep backend name (tools/bench.py only)")
    parser.add_argument(
        "--no-agreement-check",
        action="store_true",
        help="turn off deep_ep's per-call collective agreement check (buffer.check_agreement = False)",
    )
    parser.add_argument(
        "--no-value-checks",
        action="store_true",
        help="turn off deep_ep's low-latency value checks (buffer.check_values = False; DeepEP has none)",
    )
    parser.add_argument("--mode", choices=["normal", "ll", "all"], default="all")
    parser.add_argument(
        "--num-sms",
        type=int,
        default=None,
        help="normal mode: Buffer.set_num_sms(N) before the runs (DeepEP's SM budget; default: the library's, 20)",
    )
    parser.add_argument(
        "--ll-graph",
        action="store_true",
        help=(
            "GPUs: also time the low-latency dispatch+combine pair captured in one CUDA graph, and each op alone "
            "where the implementation allows (ops 'graph ...'; replays: device time and graph launch, no host)"
        ),
    )
    parser.add_argument(
        "--ll-kernel-times",
        action="store_true",
        help="GPUs: also the low-latency ops' summed kernel durations per call, DeepEP's metric (ops 'kernels ...')",
    )
    parser.add_argument(
        "--timing",
        choices=["idle", "back-to-back"],
        default="idle",
        help="GPU: each call from an idle device (default), or back to back as DeepEP's tests time (TIMING)",
    )
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], help="bfloat16 and/or fp8 (dispatch payload)")
    parser.add_argument("--iters", type=int, default=20, help="timed rounds (median taken)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drop", type=float, default=0.0, help="fraction of top-k entries set to -1")
    parser.add_argument("--launcher", choices=["local", "torchrun"], default="local")
    parser.add_argument("--dist-backend", choices=["gloo", "nccl"], default=None, help="default: gloo (local)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole local world")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--plot", help="write a PNG here (needs matplotlib)")
    parser.add_argument("--markdown", help="write the results table as Markdown here")
    parser.add_argument(
        "--profile",
        help=(
            "write, for each op at the largest size: a torch.profiler summary (GPU: with a per-call timeline) "
            "and a cProfile listing of 20 calls"
        ),
    )
    parser.add_argument("--profile-calls", type=int, default=1, help="calls per profiled op (totals over them)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="no run: merge these reports and print/write them")
    return parser


def _sizes(values: list[str], option: str, parser: argparse.ArgumentParser) -> list[int]:
    """_int_list, with a usage error (not a traceback) for a value that is not a whole number."""
    try:
        return _int_list(values)
    except ValueError:
        parser.error(f"{option} {' '.join(values)}: give whole numbers, space- or comma-separated")


def _check_shape(args: argparse.Namespace, ranks: int, parser: argparse.ArgumentParser) -> None:
    """Usage errors for a workload no run could have (instead of a rank's traceback or a silent clamp)."""
    if ranks < 1:
        parser.error(f"the group size must be >= 1, not {ranks}")
    if args.hidden < 1 or args.experts < 1 or args.topk < 0:
        parser.error("--hidden and --experts must be >= 1, --topk >= 0")
    if args.experts % ranks:
        parser.error(f"--experts={args.experts} is not divisible by the group size {ranks}")
    if args.topk > args.experts:
        parser.error(f"--topk={args.topk} > --experts={args.experts}")
    if not 0.0 <= args.drop <= 1.0:
        parser.error(f"--drop={args.drop} is not a fraction in [0, 1]")
    if args.num_sms is not None and args.num_sms < 1:
        parser.error(f"--num-sms={args.num_sms} must be >= 1")


def load_reports(paths: list[str], parser: argparse.ArgumentParser) -> list[dict]:
    """The reports to merge; a missing, unreadable or foreign file is a usage error that names it."""
    reports = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError) as error:
            parser.error(f"--merge {path}: {error}")
        if not isinstance(report, dict) or report.get("schema") != SCHEMA:
            parser.error(f"--merge {path}: not a {SCHEMA} report")
        reports.append(report)
    return reports


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    dtypes = []
    for name in args.dtype:
        if name not in _DTYPE_ALIASES:
            parser.error(f"--dtype {name!r}: choose from bfloat16 (bf16), fp8")
        if _DTYPE_ALIASES[name] not in dtypes:
            dtypes.append(_DTYPE_ALIASES[name])
    tokens = _sizes(args.tokens, "--tokens", parser)
    ll_tokens = _sizes(args.ll_tokens, "--ll-tokens", parser) if args.ll_tokens else list(tokens)
    if args.launcher == "torchrun" and "WORLD_SIZE" not in os.environ:
        parser.error("--launcher torchrun: run under torchrun (WORLD_SIZE is not set), or use --launcher local")
    ranks = int(os.environ["WORLD_SIZE"]) if args.launcher == "torchrun" else args.ranks
    _check_shape(args, ranks, parser)
    if "fp8" in dtypes and args.hidden % 128:
        parser.error(f"--hidden={args.hidden} must be a multiple of 128 for fp8")
    if min(tokens + ll_tokens) < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--tokens/--ll-tokens must be >= 1, --iters >= 1, --warmup >= 0")
    if args.timing == "back-to-back" and (args.dist_backend or "gloo") != "nccl":
        # Only GPU ranks have a device clock to time bursts with; a CPU world would be timed idle but labelled so.
        parser.error("--timing back-to-back needs GPU ranks (--dist-backend nccl)")
    return BenchConfig(
        tokens=tokens,
        ll_tokens=ll_tokens,
        hidden=args.hidden,
        topk=args.topk,
        experts=args.experts,
        ranks=ranks,
        mode=args.mode,
        dtypes=dtypes,
        iters=args.iters,
        warmup=args.warmup,
        seed=args.seed,
        drop=args.drop,
        dist_backend=args.dist_backend or "gloo",
        profile=bool(args.profile),
        profile_calls=max(1, args.profile_calls),
        progress=not args.quiet,
        ll_graph=args.ll_graph,
        ll_kernel_times=args.ll_kernel_times,
        num_sms=args.num_sms,
        timing=args.timing,
    )


def emit(report: dict, args: argparse.Namespace) -> None:
    """Print the table; write JSON, plot and profile where asked."""
    print(format_table(report), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"report written to {args.json}")
    if args.plot:
        print(plot(report, args.plot))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(format_table(report, markdown=True) + "\n")
        print(f"markdown table written to {args.markdown}")
    if getattr(args, "profile", None) and report.get("profile"):
        with open(args.profile, "w", encoding="utf-8") as f:
            f.write(report["profile"] + "\n")
        print(f"profile written to {args.profile}")


def main(
    argv: list[str] | None = None,
    impl: Impl | None = None,
    program: str = "tools/bench.py",
    parser: argparse.ArgumentParser | None = None,
) -> int:
    """Run the benchmark (or merge reports); 0 on success."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        emit(merge_reports(load_reports(args.merge, parser)), args)
        return 0
    cfg = config_from_args(args, parser)
    impl = impl or DeepEPPortable(
        args.backend, check_agreement=not args.no_agreement_check, check_values=not args.no_value_checks
    )
    if args.launcher == "torchrun":
        per_rank = run_torchrun(_worker, (cfg, impl), cfg.dist_backend)
        if per_rank is None:
            return 0
    else:
        per_rank = impl.launch_local(cfg.ranks, _worker, (cfg, impl), cfg.dist_backend, args.timeout)
    emit(build_report(per_rank, cfg, impl, program, argv), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
