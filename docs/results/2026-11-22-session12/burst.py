"""Where the reference's cached dispatch and combine lose time when issued back to back (4096 x 7168 bf16,
top-8 of 256, as tools/bench.py times them), on rank 0:
1. which calls synchronise the host with the device (torch.cuda.set_sync_debug_mode("warn"), one call each);
2. the host's time per call and the device time per call (event pairs), ten calls back to back, unprofiled,
   with the façade's agreement check off and on; a cProfile listing of ten calls;
3. a torch.profiler trace of eight calls back to back: every GPU operation's start, duration and the gap
   before it, and when the host issued it.
The other ranks make the same calls unprofiled.

    torchrun --standalone --nproc-per-node 4 docs/results/2026-11-22-session12/burst.py
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.getcwd())
import deep_ep  # noqa: E402
from tools.bench import make_routing, make_x  # noqa: E402

# Allocator events that cost the host: device allocations and frees (cudaFree synchronises), retries (free the
# cache, then allocate again), waits on other streams' use of a block.
ALLOCATOR_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def main() -> None:
    rank = int(os.environ["RANK"])
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
    ops = {
        "cached dispatch": lambda: buffer.dispatch(x, handle=handle),
        "combine": lambda: buffer.combine(recv_x, handle),
    }

    def barrier() -> None:
        dist.all_reduce(torch.ones(1, device=device))
        torch.cuda.synchronize()

    for name, call in ops.items():
        for _ in range(5):
            call()
        barrier()
        quiet = {}
        before = torch.cuda.memory_stats(device)
        for check in (False, True):  # the façade's per-call agreement check (a host barrier through the board)
            buffer.check_agreement = check
            times = []
            for _ in range(5):
                barrier()
                t0 = time.perf_counter()
                for _ in range(10):
                    call()
                times.append((time.perf_counter() - t0) / 10)
                torch.cuda.synchronize()
            quiet[check] = statistics.median(times)
        after = torch.cuda.memory_stats(device)
        allocator = {k: after.get(k, 0) - before.get(k, 0) for k in ALLOCATOR_COUNTS}
        barrier()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(10):
            call()
        profiler.disable()
        torch.cuda.synchronize()
        barrier()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            call()
            torch.cuda.set_sync_debug_mode(0)
        barrier()
        host, events = [], []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            call()
            end.record()
            host.append(time.perf_counter() - t0)
            events.append((start, end))
        torch.cuda.synchronize()
        device_ms = [s.elapsed_time(e) for s, e in events[1:]]
        barrier()
        trace_path = None
        if rank == 0:
            prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            prof.__enter__()
        for _ in range(8):
            with torch.profiler.record_function("burst.call"):
                call()
        torch.cuda.synchronize()
        if rank == 0:
            prof.__exit__(None, None, None)
            trace_path = tempfile.mktemp(suffix=".json")
            prof.export_chrome_trace(trace_path)
        barrier()
        if rank != 0:
            continue
        print(f"== {name}: sync warnings in one call: {len(caught)}")
        for w in caught:
            print(f"   {str(w.message)[:200]}  ({os.path.basename(w.filename)}:{w.lineno})")
        print(
            f"   unprofiled, 10 calls back to back: host per call median {statistics.median(host) * 1e6:.0f} us "
            f"(each: {' '.join(f'{h * 1e6:.0f}' for h in host)}); device per call (events, calls 2-10) median "
            f"{statistics.median(device_ms) * 1e3:.0f} us (each: {' '.join(f'{d * 1e3:.0f}' for d in device_ms)})"
        )
        print(
            "   host per call, bursts of 10 (median of 5): agreement check off "
            f"{quiet[False] * 1e6:.0f} us, on {quiet[True] * 1e6:.0f} us"
        )
        print(f"   caching allocator over those 100 calls: {allocator}")
        listing = io.StringIO()
        pstats.Stats(profiler, stream=listing).sort_stats("cumulative").print_stats(35)
        print("   cProfile of 10 calls back to back, by cumulative time:")
        print("\n".join("   " + line for line in listing.getvalue().splitlines() if line.strip()))
        trace = json.load(open(trace_path))
        ev = trace.get("traceEvents", trace)
        issued = {
            e["args"]["correlation"]: e["ts"]
            for e in ev
            if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
        }
        marks = sorted(e["ts"] for e in ev if e.get("name") == "burst.call" and e.get("cat") == "user_annotation")
        gpu = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
        t0 = marks[0]
        print("   profiled burst of 8 (us from the first call's start): host issue, GPU start, duration, idle before")
        print("   calls began at " + " ".join(f"+{m - t0:.0f}" for m in marks))
        reach = None
        for e in gpu:
            at = issued.get(e.get("args", {}).get("correlation"))
            gap = "" if reach is None else f"{e['ts'] - reach:8.1f}"
            host_at = "" if at is None else f"{at - t0:+.0f}"
            print(f"   {host_at:>8} {e['ts'] - t0:+9.0f} {e['dur']:8.1f} {gap:>8}  {e['name'][:70]}")
            reach = e["ts"] + e["dur"] if reach is None else max(reach, e["ts"] + e["dur"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
