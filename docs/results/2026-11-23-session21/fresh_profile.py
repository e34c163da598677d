"""Where a fresh dispatch of the cuda backend spends device and host time: torch.profiler over 10 fresh dispatches
(4096 x 7168 bf16, top-8 of 256, 32 SMs, agreement check on) on every rank, rank 0's tables printed (by device
time, then by host time), and each call's device kernels with their start relative to the call's start.

    torchrun --standalone --nproc-per-node 2 docs/results/2026-11-23-session21/fresh_profile.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import deep_ep  # noqa: E402
from tools.bench import make_routing, make_x  # noqa: E402


def main() -> None:
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    tokens, hidden, experts, topk = 4096, 7168, 256, 8
    topk_idx, weights = (t.to(device) for t in make_routing(rank, tokens, experts, topk))
    x = make_x(rank, tokens, hidden).to(device)
    buffer = deep_ep.Buffer(dist.group.WORLD, backend="cuda")
    buffer.set_num_sms(32)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    args = dict(topk_idx=topk_idx, topk_weights=weights, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert)  # fmt: skip
    for _ in range(10):
        buffer.dispatch(x, **args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            dist.barrier()
            torch.cuda.synchronize()
            with record_function("fresh_dispatch"):
                buffer.dispatch(x, **args)
            torch.cuda.synchronize()
    if rank == 0:
        table = prof.key_averages()
        print(table.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
        print(table.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60))
        prof.export_chrome_trace(os.path.join(os.environ.get("TRACE_DIR", "."), "fresh_dispatch_trace.json"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
