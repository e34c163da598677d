"""One rank's timeline of cuda fresh dispatches issued back to back (torch.profiler): per call, when the host
enters each phase and when each device operation runs, in us from the call's start. Shows what the host waits
for at the count exchange's host read and where the device idles.

    torchrun --standalone --nproc-per-node 2 docs/results/2026-11-23-session25/fresh_timeline.py

Env: T (tokens per rank, default 4096), DEEP_EP_ROOT (the tree to time; default this one). Ranks 0 and 1 print.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.environ.get("DEEP_EP_ROOT", ROOT))

import deep_ep  # noqa: E402
from deep_ep import buffer, comm  # noqa: E402
from deep_ep.backends import cuda, reference  # noqa: E402
from tools.bench import make_routing, make_x  # noqa: E402

PHASES = [
    (buffer, "check_agreement"),
    (cuda.CudaBackend, "_count_row"),
    (comm.Comm, "all_gather_host"),
    (reference, "_host_prefix_matrices"),
    (cuda.CudaBackend, "_exact_route"),
    (cuda.CudaBackend, "_push"),
    (cuda.CudaBackend, "_unpack"),
]


def mark(owner, name: str) -> None:
    inner = getattr(owner, name)

    def marked(*args, **kwargs):
        with record_function(f"phase:{name}"):
            return inner(*args, **kwargs)

    setattr(owner, name, marked)


def main() -> None:
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    tokens, hidden, experts, topk = int(os.environ.get("T", "4096")), 7168, 256, 8
    topk_idx, weights = (t.to(device) for t in make_routing(rank, tokens, experts, topk))
    x = make_x(rank, tokens, hidden).to(device)
    buf = deep_ep.Buffer(dist.group.WORLD, backend="cuda")
    buf.set_num_sms(32)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    for name in PHASES:
        mark(*name)
    for _ in range(30):
        buf.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            with record_function("call"):
                buf.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
        torch.cuda.synchronize()
    events = prof.events()
    calls = sorted((e for e in events if e.name == "call"), key=lambda e: e.time_range.start)
    kernels = sorted(
        (e for e in events if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start
    )
    phases = sorted((e for e in events if e.name.startswith("phase:")), key=lambda e: e.time_range.start)
    lines = [f"rank {rank}: host call lengths (us): " + " ".join(f"{c.time_range.elapsed_us():.0f}" for c in calls)]
    for index in (4, 5, 6):
        call = calls[index]
        begin, end = call.time_range.start, calls[index + 1].time_range.start
        lines.append(f"-- call {index}, host {call.time_range.elapsed_us():.0f} us")
        for p in phases:
            if begin <= p.time_range.start < end:
                lines.append(f"   host {p.time_range.start - begin:7.0f} +{p.time_range.elapsed_us():6.0f}  {p.name}")
        for k in kernels:
            if begin <= k.time_range.start < end:
                lines.append(
                    f"   dev  {k.time_range.start - begin:7.0f} +{k.time_range.elapsed_us():6.0f}  {k.name[:70]}"
                )
    time.sleep(0.2 * rank)
    print("\n".join(lines), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
