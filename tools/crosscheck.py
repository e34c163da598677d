"""Differential cross-check: any backend against the reference backend and the executable spec (SPEC 9).

Runs seeded workload families (uniform, skewed, group_limited, sparse, idle_rank, empty_rank, max_tokens,
small_hidden, and with --large large_hidden = 7168) in normal mode (layout, dispatch, combine, cached
dispatch, combine as backward, cached dispatch of x, dispatch without top-k, and dispatch, cached dispatch and
combine with num_worst_tokens) and low-latency mode, in bf16, fp8 and int8, through every participant
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
actual), optionally a JSON report (`--json -`: the JSON on stdout, everything else on stderr). Exit status: 0
PASS; 1 FAIL (any mismatch or error); 3 NOT RUN (nothing failed, but some participant was compared in no case,
e.g. skipped as unavailable); 2 for arguments that cannot run (argparse's usage error).
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

import deep_ep  # noqa: E402
from deep_ep.testing import diff  # noqa: E402
from deep_ep.testing.cli import at_least  # noqa: E402
from deep_ep.testing.workloads import FAMILIES, LARGE_HIDDEN  # noqa: E402


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", default="spec,reference", help="comma list; the first is the oracle")
    parser.add_argument(
        "--backend", help="shorthand: participants = spec,reference,BACKEND (compare BACKEND with both)"
    )
    parser.add_argument(
        "--world", type=at_least(1), default=4, help="ranks of the local launcher (ignored under torchrun)"
    )
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
    parser.add_argument("--tokens", type=at_least(0), default=16, help="N, tokens per rank")
    parser.add_argument(
        "--max-tokens", type=at_least(0), default=None, help="T >= N (default 1.5 N); max_tokens uses N = T"
    )
    parser.add_argument("--hidden", type=at_least(1), default=128)
    parser.add_argument("--small-hidden", type=at_least(1), default=16)
    parser.add_argument("--large-hidden", type=at_least(1), default=LARGE_HIDDEN)
    parser.add_argument("--topk", type=at_least(1), default=4)
    parser.add_argument("--experts-per-rank", type=at_least(1), default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=at_least(1), default=1, help="seeds per (family, mode, dtype)")
    parser.add_argument(
        "--rules", choices=diff.RULES, default="spec9", help="spec9: SPEC 9 tolerances; exact: all bits"
    )
    parser.add_argument("--json", help="write the JSON report here ('-' = stdout)")
    parser.add_argument("--max-mismatches", type=at_least(0), default=10, help="mismatches printed")
    parser.add_argument("--setup", help="'module:function' run in every rank first (e.g. registers a backend)")
    parser.add_argument(
        "--timeout", type=at_least(1, float), default=900.0, help="seconds for the whole run (local launcher)"
    )
    parser.add_argument(
        "--comm-timeout",
        type=at_least(1, float),
        default=120.0,
        help="seconds a participant's collective waits for peers (a participant failing on some ranks only "
        "costs this long once; its group is then replaced)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, checked: argparse's usage error (exit 2) for a run that could not compare anything."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.backend:
        args.participants = f"spec,reference,{args.backend}"
    if args.max_tokens is not None and args.max_tokens < args.tokens:
        parser.error(f"--max-tokens={args.max_tokens} is less than --tokens={args.tokens} (T bounds N)")
    if args.launcher == "torchrun" and not _torchrun_env():
        parser.error("--launcher torchrun needs RANK and WORLD_SIZE in the environment: start it with torchrun")
    try:
        plan = build_plan(args, 1)  # names of families, modes, dtypes, participants; the cases do not need R
    except ValueError as error:
        parser.error(str(error))
    if not plan.cases:
        parser.error(
            f"no case to run for --modes {args.modes} --dtypes {args.dtypes} (fp8_round, fp8_ue8m0: low_latency)"
        )
    return args


def backend_problem(args: argparse.Namespace) -> str | None:
    """Run --setup in this process (registration is per process), then name participants of no registered
    backend: one message here instead of a traceback from every rank."""
    try:
        diff.load_setup(args.setup)
    except (ImportError, AttributeError) as error:
        return f"--setup {args.setup}: {type(error).__name__}: {error}"
    known = deep_ep.list_backends()
    named = {p.name for p in map(diff.Participant.parse, _csv(args.participants)) if p.kind == "backend"}
    unknown = sorted(named - set(known))
    if unknown:
        return f"unknown backend {', '.join(map(repr, unknown))}; registered backends: {', '.join(known)}"
    return None


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
    out = sys.stderr if args.json == "-" else sys.stdout  # stdout holds nothing but the JSON then
    print(report.format(args.max_mismatches), file=out)
    print(f"({len(report.plan.cases)} cases in {seconds:.1f} s)", file=out)
    if args.json:
        report.write_json(args.json)
        if args.json != "-":
            print(f"JSON report: {args.json}", file=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torchrun = args.launcher == "torchrun" or (args.launcher == "auto" and _torchrun_env())
    if not torchrun:
        problem = backend_problem(args)
        if problem:
            _parser().error(problem)
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
        problem = backend_problem(args)  # every rank finds the same one; rank 0 says it
        if problem:
            if rank == 0:
                print(f"{os.path.basename(sys.argv[0])}: error: {problem}", file=sys.stderr)
            return 2
        plan = build_plan(args, world)
        result = diff.run_rank(rank, world, plan)  # --setup ran above
        report = diff.Report(plan, diff.gather_results(result))
        if rank == 0:
            _emit(report, args, time.perf_counter() - start)
        return report.exit_status
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
