"""Self-test of the `cuda` backend on one GPU host: every normal-mode output against the `reference` backend,
bit for bit, over NCCL, then a quick timing of both at DeepEP's benchmark shape.

    python3 tools/cuda_selftest.py --world 4              # spawns 4 ranks, one GPU each (NCCL)
    torchrun --nproc-per-node 4 tools/cuda_selftest.py    # the same under torchrun

Each rank builds every rank's inputs from one seeded generator (deep_ep.testing.workloads), runs each
operation on a `cuda` Buffer and on a `reference` Buffer of the same group, and compares the results bit for
bit: layout; dispatch with and without top-k, with expert alignment, with an fp8 (x, scales) tuple whose scales
are not contiguous, with a column-major is_token_in_rank, asynchronously, and with num_worst_tokens; cached
dispatch (a float32 gradient, x itself, the fp8 tuple); combine with 0, 1 and 2 biases, with top-k weights, in
float32; and on each GPU the low-latency dispatch's fused fp8 cast against deep_ep.quant on rows with NaN,
infinities and extremes. Prints one line per workload and every failure, then the timing table; exits 1 if any
check failed on any rank. `--quick` runs a few workloads only; `--no-timing` skips the timing. The CPU test
suite runs this same comparison on gloo with a CPU stand-in of the backend.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from deep_ep import Buffer  # noqa: E402
from deep_ep.testing import run_ranks  # noqa: E402
from deep_ep.testing.compare import assert_bit_equal  # noqa: E402
from deep_ep.testing.workloads import ROUTINGS, make_workload  # noqa: E402

HANDLE_ITEMS = (
    "rank_prefix_matrix",
    "channel_prefix_matrix",
    "recv_channel_prefix_matrix",
    "recv_src_idx",
    "is_token_in_rank",
    "send_head",
)


@dataclass
class Case:
    """One workload: tokens per rank (an int, or a list per rank), shapes, routing family, seed."""

    name: str
    tokens: int | list[int]
    hidden: int
    experts: int  # rounded up to a multiple of the group size
    topk: int
    routing: str
    seed: int
    full: bool = True  # every variant; False: the main operations only (large shapes)


@dataclass
class Options:
    candidate: str = "cuda"
    quick: bool = False
    timing: bool = True
    warmup: int = 5
    iters: int = 20
    comm_timeout: float = 60.0
    cases: list[Case] | None = None  # None: `cases(world, quick)`
    register: tuple[str, str | type] | None = None  # (name, class or "module:Class") to register in every rank


@dataclass
class RankReport:
    checks: list[tuple[str, str | None]] = field(default_factory=list)  # (name, None or the mismatch)
    timing: dict[str, float] = field(default_factory=dict)  # "backend/op" -> median ms; "recv_bytes"
    reduction: str = ""  # which combine reduction CUDA tensors got ("triton", or "torch (why)")
    seconds: float = 0.0


def cases(world: int, quick: bool = False) -> list[Case]:
    """The workloads: every routing family, edge token counts, uneven ranks, few experts, DeepEP's shape."""
    out: list[Case] = []
    seed = 100
    for routing in ROUTINGS:
        out.append(Case(f"{routing}-512x7168-e256k8", 512, 7168, 256, 8, routing, seed))
        seed += 1
    for tokens in (0, 1, 17):
        for hidden in (128, 7168):
            out.append(Case(f"uniform-{tokens}x{hidden}-e256k8", tokens, hidden, 256, 8, "uniform", seed))
            seed += 1
    uneven = [17, 0, 512, 1, 3, 0, 9, 64]
    uneven = [uneven[r % len(uneven)] for r in range(world)]
    out.append(Case("uneven-tokens-sparse-x128", uneven, 128, 256, 8, "sparse", seed))
    out.append(Case("uneven-tokens-skewed-x7168", uneven, 7168, 64, 4, "skewed", seed + 1))
    out.append(Case(f"few-experts-e{2 * world}k2-512x128", 512, 128, 2 * world, 2, "sparse", seed + 2))
    out.append(Case(f"one-expert-per-rank-e{world}k1-17x7168", 17, 7168, world, 1, "uniform", seed + 3))
    out.append(Case("skewed-4096x128-e256k8", 4096, 128, 256, 8, "skewed", seed + 4, full=False))
    out.append(Case("uniform-4096x7168-e256k8", 4096, 7168, 256, 8, "uniform", seed + 5, full=False))
    if quick:
        keep = {"uniform-512x7168-e256k8", "sparse-512x7168-e256k8", "uniform-0x128-e256k8", "uniform-17x7168-e256k8"}
        keep.add("uneven-tokens-sparse-x128")
        out = [c for c in out if c.name in keep]
    return out


def _mismatch(actual: object, expected: object) -> str | None:
    try:
        assert_bit_equal("", actual, expected)
    except AssertionError as error:
        return str(error).lstrip(": ")
    return None


def _layout_kwargs(layout: tuple) -> dict:
    return dict(
        num_tokens_per_rank=layout[0],
        num_tokens_per_rdma_rank=layout[1],
        num_tokens_per_expert=layout[2],
        is_token_in_rank=layout[3],
    )


def _expert_output(recv_x: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """What an expert returns: rows that differ per destination rank, so the ordered sum is exercised."""
    return (recv_x.float() * (rank + 1) + 0.25).to(dtype)


def compare_case(rank: int, world: int, cand: Buffer, ref: Buffer, case: Case, report: RankReport) -> None:
    """Run every operation of `case` on both Buffers (same order on every rank) and record the comparisons."""
    device = cand.device
    experts = -(-case.experts // world) * world
    w = make_workload(world, case.tokens, case.hidden, case.topk, experts, seed=case.seed, routing=case.routing)
    x, topk_idx, topk_weights = (t[rank].to(device) for t in (w.x, w.topk_idx, w.topk_weights))
    num_tokens, hidden = x.shape
    gen = torch.Generator().manual_seed(case.seed * 1000 + rank)

    def check(name: str, actual: object, expected: object) -> None:
        report.checks.append((f"{case.name}/{name}", _mismatch(actual, expected)))

    def both(fn):  # candidate first, then reference: the same call order on every rank
        return fn(cand), fn(ref)

    # Layout (SPEC 3).
    la, lb = both(lambda b: b.get_dispatch_layout(topk_idx, experts))
    for i, key in enumerate(
        ["num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert", "is_token_in_rank"]
    ):
        check(f"layout.{key}", la[i], lb[i])
    layout = _layout_kwargs(lb)

    # Fresh dispatch with top-k (SPEC 4).
    da, db = both(lambda b: b.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **layout))
    for i, key in enumerate(["recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert_list"]):
        check(f"dispatch.{key}", da[i], db[i])
    for i, key in enumerate(HANDLE_ITEMS):
        check(f"dispatch.handle.{key}", da[4][i], db[4][i])
    recv_x = db[0]

    if case.full:
        aa, ab = both(
            lambda b: b.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, expert_alignment=128, **layout)
        )
        check("dispatch(align=128).count_list", aa[3], ab[3])
        na, nb = both(lambda b: b.dispatch(x, **layout))
        check("dispatch(no topk).recv_x", na[0], nb[0])
        check("dispatch(no topk).recv_src_idx", na[4][3], nb[4][3])
        check("dispatch(no topk).topk outputs", (na[1], na[2]), (nb[1], nb[2]))
        if hasattr(torch, "float8_e4m3fn"):
            x_q = x.to(torch.float8_e4m3fn)
            num_scales = -(-hidden // 128)
            # Scales travel unchanged; a transposed (non-contiguous) tensor checks the packing path.
            scales = (torch.rand(num_scales, num_tokens, generator=gen) + 0.5).to(device).t()
            fa, fb = both(lambda b: b.dispatch((x_q, scales), topk_idx=topk_idx, topk_weights=topk_weights, **layout))
            check("dispatch(fp8 tuple).recv_x", fa[0][0], fb[0][0])
            check("dispatch(fp8 tuple).recv_scales", fa[0][1], fb[0][1])
            check("dispatch(fp8 tuple).recv_src_idx", fa[4][3], fb[4][3])
            # Cached, the scales travel with x in one launch (the pull kernel's companion).
            qa, qb = cand.dispatch((x_q, scales), handle=da[4]), ref.dispatch((x_q, scales), handle=db[4])
            check("cached_dispatch(fp8 tuple).recv_x", qa[0][0], qb[0][0])
            check("cached_dispatch(fp8 tuple).recv_scales", qa[0][1], qb[0][1])
        # A column-major is_token_in_rank (same values), then its handle's cached dispatch.
        column_major = dict(layout, is_token_in_rank=layout["is_token_in_rank"].t().contiguous().t())
        ma, mb = both(lambda b: b.dispatch(x, **column_major))
        check("dispatch(column-major mask).recv_x", ma[0], mb[0])
        check("dispatch(column-major mask).recv_src_idx", ma[4][3], mb[4][3])
        check(
            "cached_dispatch(column-major mask).recv_x",
            cand.dispatch(x, handle=ma[4])[0],
            ref.dispatch(x, handle=mb[4])[0],
        )
        ea, eb = both(
            lambda b: b.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, async_finish=True, **layout)
        )
        ea[5].current_stream_wait()
        eb[5].current_stream_wait()
        check("dispatch(async_finish).recv_x", ea[0], eb[0])

    # Cached dispatch with the handle (SPEC 4): a float32 "gradient", a different row width.
    grad = x.float() * 0.5 - 1.0
    ca, cb = cand.dispatch(grad, handle=da[4]), ref.dispatch(grad, handle=db[4])
    check("cached_dispatch.recv_x", ca[0], cb[0])
    # x itself: rows of an odd number of 2-byte elements are not whole 4-byte words (the push path then).
    xa, xb = cand.dispatch(x, handle=da[4]), ref.dispatch(x, handle=db[4])
    check("cached_dispatch(x).recv_x", xa[0], xb[0])

    # Combine (SPEC 5): expert outputs that differ per destination, 0/1/2 biases, with and without weights.
    y = _expert_output(recv_x, rank, torch.bfloat16)
    bias0 = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).to(device)
    bias1 = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).to(device)
    variants = [("no bias", None, db[2]), ("bias pair", (bias0, bias1), db[2])]
    if case.full:
        variants += [("no weights", None, None), ("one bias", bias0, None), ("bias (None, b1)", (None, bias1), db[2])]
    for label, bias, weights in variants:
        ra = cand.combine(y, da[4], topk_weights=weights, bias=bias)
        rb = ref.combine(y, db[4], topk_weights=weights, bias=bias)
        check(f"combine({label}).combined_x", ra[0], rb[0])
        check(f"combine({label}).combined_topk_weights", ra[1], rb[1])
    if case.full:
        y32 = _expert_output(recv_x, rank, torch.float32)
        ra, rb = cand.combine(y32, da[4]), ref.combine(y32, db[4])
        check("combine(float32).combined_x", ra[0], rb[0])
        ra = cand.combine(y, da[4], topk_weights=db[2], async_finish=True)
        rb = ref.combine(y, db[4], topk_weights=db[2], async_finish=True)
        ra[2].current_stream_wait()
        rb[2].current_stream_wait()
        check("combine(async_finish).combined_x", ra[0], rb[0])
        check("combine(async_finish).combined_topk_weights", ra[1], rb[1])

        # num_worst_tokens: padded receive tensors, no host synchronisation (SPEC 4).
        worst = max(1, sum(t.shape[0] for t in w.x))  # no rank can receive more than every token once
        wa, wb = both(
            lambda b: b.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=worst, **layout)
        )
        for i, key in enumerate(["recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert_list"]):
            check(f"dispatch(num_worst_tokens).{key}", wa[i], wb[i])
        for i, key in enumerate(HANDLE_ITEMS):
            check(f"dispatch(num_worst_tokens).handle.{key}", wa[4][i], wb[4][i])
        wca, wcb = cand.dispatch(grad, handle=wa[4]), ref.dispatch(grad, handle=wb[4])
        check("cached_dispatch(num_worst_tokens).recv_x", wca[0], wcb[0])
        wy = _expert_output(wb[0], rank, torch.bfloat16)
        ra = cand.combine(wy, wa[4], topk_weights=wb[2], bias=bias0)
        rb = ref.combine(wy, wb[4], topk_weights=wb[2], bias=bias0)
        check("combine(num_worst_tokens).combined_x", ra[0], rb[0])
        check("combine(num_worst_tokens).combined_topk_weights", ra[1], rb[1])

    # The outputs of a call must not alias the workspace that the next call overwrites.
    check("dispatch.recv_x unchanged by later calls", da[0], db[0])


def _time(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of `fn()` over `iters` runs after `warmup`, ranks started together, CUDA events."""
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        dist.barrier(device_ids=[torch.cuda.current_device()])
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_backends(rank: int, world: int, buffers: dict[str, Buffer], opts: Options, report: RankReport) -> None:
    """DeepEP's benchmark shape: 4096 tokens x 7168 bf16, top-8 of 256 experts; dispatch and combine."""
    experts = -(-256 // world) * world
    w = make_workload(world, 4096, 7168, 8, experts, seed=7, routing="uniform")
    device = next(iter(buffers.values())).device
    x, topk_idx, topk_weights = (t[rank].to(device) for t in (w.x, w.topk_idx, w.topk_weights))
    for name, buf in buffers.items():
        buf.check_agreement = False  # DeepEP has no such check; time the data path
        layout = _layout_kwargs(buf.get_dispatch_layout(topk_idx, experts))
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **layout)
        report.timing["recv_bytes"] = float(recv_x.shape[0] * recv_x.shape[1] * 2)
        report.timing[f"{name}/dispatch"] = _time(
            lambda buf=buf, layout=layout: buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **layout),
            opts.warmup,
            opts.iters,
        )
        report.timing[f"{name}/cached_dispatch"] = _time(
            lambda buf=buf, handle=handle: buf.dispatch(x, handle=handle), opts.warmup, opts.iters
        )
        report.timing[f"{name}/combine"] = _time(
            lambda buf=buf, handle=handle, y=recv_x: buf.combine(y, handle), opts.warmup, opts.iters
        )
        buf.check_agreement = True


def check_fp8_cast(device: torch.device, report: RankReport) -> None:
    """The low-latency dispatch's fused fp8 cast (one Triton kernel) against deep_ep.quant's torch ops, bit for
    bit, on rows that hold NaN (both signs), infinities, zeros, bf16's extremes and subnormals, for every scale
    option (the harness's workloads hold finite values only)."""
    from deep_ep.backends.base import LowLatencyDispatchArgs
    from deep_ep.backends.cuda_low_latency import FUSED_CAST_ENV, message_payload

    specials = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 3.3895e38, -3.3895e38, 1e-40, 448.0, 1e-6]
    for hidden in (128, 512, 7168):
        generator = torch.Generator(device="cpu").manual_seed(hidden)
        x = torch.randn(len(specials) + 4, hidden, generator=generator).to(torch.bfloat16)
        for row, value in enumerate(specials):  # one special value per row, in a block of ordinary values
            x[row, (row * 131) % hidden] = value
        x[len(specials), :] = float("nan")  # whole rows: NaN, infinity, zeros
        x[len(specials) + 1, :] = float("-inf")
        x[len(specials) + 2, :] = 0.0
        x.view(torch.int16)[len(specials) + 3, : hidden // 2] = -64  # 0xFFC0: a NaN with its sign bit set
        x = x.to(device)
        for round_scale, use_ue8m0 in ((False, False), (True, False), (True, True)):
            if use_ue8m0 and hidden % 512:
                continue
            args = LowLatencyDispatchArgs(x, None, x.shape[0], 8, True, "fp8", round_scale, use_ue8m0)
            fused = message_payload(args)[0].clone()
            os.environ[FUSED_CAST_ENV] = "0"
            try:
                unfused = message_payload(args)[0]
            finally:
                del os.environ[FUSED_CAST_ENV]
            name = f"fused-fp8-cast-nan-inf/H={hidden} round_scale={round_scale} use_ue8m0={use_ue8m0}"
            report.checks.append((name, _mismatch(fused, unfused)))


def rank_main(rank: int, world: int, opts: Options) -> RankReport:
    """Everything one rank does; returns its checks and timings."""
    begin = time.perf_counter()
    if opts.register is not None:
        from deep_ep import register_backend

        register_backend(*opts.register)
    group = dist.group.WORLD
    cand = Buffer(group, backend=opts.candidate)
    ref = Buffer(group, backend="reference")
    for buf in (cand, ref):
        buf.comm_timeout = opts.comm_timeout
    report = RankReport()
    todo = opts.cases if opts.cases is not None else cases(world, opts.quick)
    for i, case in enumerate(todo):
        if rank == 0:
            print(f"[selftest] {i + 1}/{len(todo)} {case.name}", flush=True)
        compare_case(rank, world, cand, ref, case, report)
    if cand.device.type == "cuda":
        check_fp8_cast(cand.device, report)
    if opts.timing and cand.device.type == "cuda":
        if rank == 0:
            print("[selftest] timing 4096x7168 bf16, top-8 of 256 experts", flush=True)
        time_backends(rank, world, {opts.candidate: cand, "reference": ref}, opts, report)
    from deep_ep.kernels import ordered_sum

    report.reduction = ordered_sum.status()
    report.seconds = time.perf_counter() - begin
    return report


def summarize(reports: list[RankReport], world: int, candidate: str) -> int:
    """Print the PASS/FAIL table and the timing table; return the exit status."""
    names = [name for name, _ in reports[0].checks]
    failures: list[str] = []
    per_case: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        case = name.split("/", 1)[0]
        bad = [(r, rep.checks[i][1]) for r, rep in enumerate(reports) if rep.checks[i][1] is not None]
        stats = per_case.setdefault(case, [0, 0])
        stats[0] += 1
        if bad:
            stats[1] += 1
            failures.append(f"FAIL {name}: " + "; ".join(f"rank {r}: {why}" for r, why in bad[:2]))
    width = max(len(c) for c in per_case) if per_case else 10
    print(f"\n{candidate} vs reference, {world} ranks, bit for bit")
    print(f"{'workload':<{width}}  checks  failed  result")
    print("-" * (width + 24))
    for case, (total, failed) in per_case.items():
        print(f"{case:<{width}}  {total:>6}  {failed:>6}  {'PASS' if not failed else 'FAIL'}")
    for line in failures:
        print(line)
    if reports[0].timing:
        print("\ntiming at 4096 tokens x 7168 bf16, top-8 of 256 (median of the per-rank medians; worst rank)")
        print("bandwidth = received rows (own included) x 7168 x 2 bytes / time (DeepEP's metric)")
        print(f"{'backend/op':<26} {'median ms':>10} {'worst ms':>10} {'GB/s (worst rank)':>18}")
        for key in [k for k in reports[0].timing if k != "recv_bytes"]:
            times = [rep.timing[key] for rep in reports]
            rates = [rep.timing["recv_bytes"] / 1e9 / (rep.timing[key] / 1e3) for rep in reports]
            print(f"{key:<26} {statistics.median(times):>10.3f} {max(times):>10.3f} {min(rates):>18.1f}")
        print(
            f"SMs: the cuda push kernels run on Config.num_sms = {Buffer.num_sms} SMs; the copy-out is a device memcpy "
            "and the combine's sum one kernel over the whole GPU"
        )
    print(f"combine reduction on rank 0: {reports[0].reduction}")
    total = sum(len(rep.checks) for rep in reports)
    failed = sum(1 for rep in reports for _, why in rep.checks if why is not None)
    print(f"\n{total - failed} passed, {failed} failed")
    print(f"RESULT: {'PASS' if not failed else 'FAIL'} ({max(rep.seconds for rep in reports):.1f} s per rank)")
    return 0 if not failed else 1


def _torchrun_main(opts: Options) -> int:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        report = rank_main(rank, world, opts)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, report)
        status = summarize(gathered, world, opts.candidate) if rank == 0 else 0
        flag = torch.tensor([status], device="cuda")
        dist.all_reduce(flag)
        return int(flag.item() != 0)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=0, help="spawn this many ranks (else: run under torchrun)")
    parser.add_argument("--backend", default="cuda", help="the backend under test (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="a few workloads only")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run (spawn mode)")
    parser.add_argument("--dist-backend", default="nccl", help="torch.distributed backend in spawn mode (gloo: CPU)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # NVLink multicast stays off
    opts = Options(args.backend, args.quick, not args.no_timing, args.warmup, args.iters)
    if args.world <= 0:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            parser.error("give --world N, or launch under torchrun")
        return _torchrun_main(opts)
    print(f"[selftest] {args.world} ranks over {args.dist_backend}, {args.backend!r} vs 'reference'", flush=True)
    reports = run_ranks(
        args.world,
        rank_main,
        opts,
        backend=args.dist_backend,
        timeout=args.timeout,
        env={"TORCH_SYMM_MEM_DISABLE_MULTICAST": os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"]},
    )
    return summarize(reports, args.world, args.backend)


if __name__ == "__main__":
    sys.exit(main())
