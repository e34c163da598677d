"""Every rank's device timeline for the reference's cached dispatch and combine issued back to back (4096 x 7168
bf16, top-8 of 256, as tools/bench.py times them), next to a raw all_to_all_single of the dispatch's bytes.
All ranks record 8 calls of each op with torch.profiler; rank 0 prints, per call and per rank, each GPU
operation's start (us from the burst's first kernel on any rank, clocks aligned through the traces' base time)
and duration, then per rank the mean all-to-all kernel time and the mean time per call. What it answers: which
rank the others' all-to-all waits for, and for how long.

    torchrun --standalone --nproc-per-node 4 docs/results/2026-11-22-session14/timeline.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.getcwd())
import deep_ep  # noqa: E402
from tools.bench import make_routing, make_x  # noqa: E402

CALLS = 8


def gpu_events(prof: torch.profiler.profile) -> list[tuple[float, float, str]]:
    """(start us on the host's clock, duration us, name) of every kernel/memcpy/memset in the trace."""
    path = tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)
    os.unlink(path)
    base = trace.get("baseTimeNanoseconds", 0) / 1e3 if isinstance(trace, dict) else 0.0
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    out = [
        (e["ts"] + base, e["dur"], e["name"])
        for e in events
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e
    ]
    return sorted(out)


def short(name: str) -> str:
    for key, label in (
        ("SendRecv", "a2a"),
        ("gather_kernel", "gather"),
        ("ordered_gather_sum", "sum"),
        ("Fill", "fill"),
        ("copy", "copy"),
    ):
        if key in name:
            return label
    return name[:24]


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    tokens, hidden, experts, topk = 4096, 7168, 256, 8
    topk_idx, weights = (t.to(device) for t in make_routing(rank, tokens, experts, topk))
    x = make_x(rank, tokens, hidden).to(device)
    buffer = deep_ep.Buffer(dist.group.WORLD, backend=os.environ.get("BACKEND", "reference"))
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    # The raw baseline: the dispatch's bytes as uint8 rows with its split sizes (bench.py's RAW).
    send_splits = in_rank.sum(0).tolist()
    counts = torch.tensor(send_splits, device=device)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts)
    recv_splits = recv_counts.tolist()
    raw_in = torch.empty((sum(send_splits), hidden * 2), dtype=torch.uint8, device=device)
    raw_out = torch.empty((sum(recv_splits), hidden * 2), dtype=torch.uint8, device=device)
    ops = {
        "raw all_to_all_single": lambda: dist.all_to_all_single(raw_out, raw_in, recv_splits, send_splits),
        "cached dispatch": lambda: buffer.dispatch(x, handle=handle),
        "combine": lambda: buffer.combine(recv_x, handle),
    }
    no_check = os.environ.get("NO_CHECK") == "1"
    buffer.check_agreement = not no_check

    def barrier() -> None:
        dist.all_reduce(torch.ones(1, device=device))
        torch.cuda.synchronize()

    for name, call in ops.items():
        for _ in range(5):
            call()
        barrier()
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(CALLS):
                call()
            torch.cuda.synchronize()
        barrier()
        mine = gpu_events(prof)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank != 0:
            continue
        t0 = min(e[0][0] for e in everyone if e)
        print(f"== {name}: {world} ranks, {CALLS} calls back to back (us from the first kernel on any rank)")
        a2a_name = "a2a"
        per_rank_lines = []
        for r, events in enumerate(everyone):
            cells = [f"{short(n)}@{s - t0:.0f}+{d:.0f}" for s, d, n in events]
            print(f"  rank {r}: " + " ".join(cells))
            a2a = [(s, d) for s, d, n in events if short(n) == a2a_name]
            starts = [s for s, _ in a2a]
            step = statistics.mean(b - a for a, b in zip(starts, starts[1:])) if len(starts) > 1 else float("nan")
            ends = [s + d for s, d in a2a]
            per_rank_lines.append(
                f"  rank {r}: a2a kernel mean {statistics.mean(d for _, d in a2a):.1f} us; a2a start to start "
                f"{step:.1f} us; last a2a ends at {max(ends) - t0:.0f}"
            )
        print("\n".join(per_rank_lines))
        # Which rank arrives last at each all-to-all: the latest kernel start per call.
        starts = [[s for s, _, n in events if short(n) == a2a_name] for events in everyone]
        late = []
        for i in range(min(len(s) for s in starts)):
            col = [s[i] for s in starts]
            last = max(range(world), key=lambda r: col[r])
            late.append(f"{last}(+{col[last] - min(col):.0f})")
        print("  last to start each a2a (rank(+us after the first)): " + " ".join(late))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
