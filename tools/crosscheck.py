"""Differential cross-check: any backend against the reference backend and the executable spec (SPEC 9).

Runs seeded workload families (uniform, skewed, group_limited, sparse, idle_rank, empty_rank, max_tokens,
small_hidden, and with --large large_hidden = 7168) in normal mode (layout, dispatch, combine, cached
dispatch, combine as backward) and low-latency mode, in bf16, fp8 and int8, through every participant
inside one multi-rank run, and compares each participant with the first one (the oracle).

Participants: `spec` (the executable spec, reference/), or `NAME[@DEVICE][/GROUP][:any-order]`: a
registered backend on a device (default: the group's) over the run's process group, or over a second
group of another torch.distributed backend, e.g. `reference@cuda/gloo` (CUDA tensors over gloo).

    python tools/crosscheck.py                                   # 4 local gloo ranks: spec vs reference
    python tools/crosscheck.py --participants spec,reference,reference@cpu/gloo --world 3
    python tools/crosscheck.py --participants reference,ascend --setup mypkg.testing:register
    torchrun --nproc-per-node 4 tools/crosscheck.py --dist-backend nccl \\
        --participants reference@cuda/nccl,spec,reference@cuda/gloo --large --json report.json

Prints progress to stderr, a table per op, the first mismatches (case, rank, op, tensor, index, expected,
actual), optionally a JSON report; exits 1 on any mismatch or error, 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from deep_ep.testing import diff  # noqa: E402
from deep_ep.testing.workloads import FAMILIES, LARGE_HIDDEN  # noqa: E402


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", default="spec,reference", help="comma list; the first is the oracle")
    parser.add_argument(
        "--backend", help="shorthand: participants = spec,reference,BACKEND (compare BACKEND with both)"
    )
    parser.add_argument("--world", type=int, default=4, help="ranks of the local launcher (ignored under torchrun)")
    parser.add_argument(
        "--launcher",
        choices=["auto", "local", "torchrun"],
        default="auto",
        help="local: fork the ranks here (deep_ep.testing.run_ranks); torchrun: this process is one rank "
        "(auto: torchrun when RANK/WORLD_SIZE are set)",
    )
    parser.add_argument("--dist-backend", default="gloo", help="backend of the run's process group (gloo, nccl)")
    parser.add_argument("--families", default="all", help=f"comma list of {', '.join(FAMILIES)}, or all")
    parser.add_argument("--large", action="store_true", help="include large_hidden (H=7168) in 'all'")
    parser.add_argument("--modes", default="normal,low_latency")
    parser.add_argument(
        "--dtypes", default="bf16,fp8,int8", help="bf16, fp8, int8 (low-latency also fp8_round, fp8_ue8m0)"
    )
    parser.add_argument("--tokens", type=int, default=16, help="N, tokens per rank")
    parser.add_argument("--max-tokens", type=int, default=None, help="T (default 1.5 N); max_tokens uses N = T")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--small-hidden", type=int, default=16)
    parser.add_argument("--large-hidden", type=int, default=LARGE_HIDDEN)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--experts-per-rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="seeds per (family, mode, dtype)")
    parser.add_argument(
        "--rules", choices=diff.RULES, default="spec9", help="spec9: SPEC 9 tolerances; exact: all bits"
    )
    parser.add_argument("--json", help="write the JSON report here ('-' = stdout)")
    parser.add_argument("--max-mismatches", type=int, default=10, help="mismatches printed")
    parser.add_argument("--setup", help="'module:function' run in every rank first (e.g. registers a backend)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run (local launcher)")
    parser.add_argument(
        "--comm-timeout",
        type=float,
        default=120.0,
        help="seconds a participant's collective waits for peers (a participant failing on some ranks only "
        "costs this long once; its group is then replaced)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.backend:
        args.participants = f"spec,reference,{args.backend}"
    return args


def _torchrun_env() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def build_plan(args: argparse.Namespace, world: int) -> diff.Plan:
    families = [] if args.families == "all" else _csv(args.families)
    cases = diff.make_cases(
        world,
        families=families,
        modes=_csv(args.modes),
        dtypes=_csv(args.dtypes),
        num_tokens=args.tokens,
        max_tokens=args.max_tokens,
        hidden=args.hidden,
        small_hidden=args.small_hidden,
        large_hidden=args.large_hidden,
        num_topk=args.topk,
        experts_per_rank=args.experts_per_rank,
        seed=args.seed,
        repeats=args.repeats,
        large=args.large,
    )
    return diff.Plan(
        [diff.Participant.parse(p) for p in _csv(args.participants)],
        cases,
        world_backend=args.dist_backend,
        rules=args.rules,
        progress=not args.quiet,
        comm_timeout=args.comm_timeout,
    )


def _emit(report: diff.Report, args: argparse.Namespace, seconds: float) -> None:
    print(report.format(args.max_mismatches))
    print(f"({len(report.plan.cases)} cases in {seconds:.1f} s)")
    if args.json:
        report.write_json(args.json)
        if args.json != "-":
            print(f"JSON report: {args.json}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torchrun = args.launcher == "torchrun" or (args.launcher == "auto" and _torchrun_env())
    if not torchrun:
        plan = build_plan(args, args.world)
        report = diff.run_local(
            args.world, plan, setup=args.setup, dist_backend=args.dist_backend, timeout=args.timeout
        )
        _emit(report, args, time.perf_counter() - start)
        return report.exit_status

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.dist_backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    torch.set_num_threads(max(1, min(8, (os.cpu_count() or 1) // max(1, world))))
    dist.init_process_group(args.dist_backend, timeout=datetime.timedelta(seconds=args.timeout))
    try:
        plan = build_plan(args, world)
        result = diff.run_rank(rank, world, plan, args.setup)
        report = diff.Report(plan, diff.gather_results(result))
        if rank == 0:
            _emit(report, args, time.perf_counter() - start)
        return report.exit_status
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
