"""Eighteenth session: cProfile of the cuda backend's host path, rank 0, 200 calls issued back to back (after 20
warm-up calls) of a cached dispatch and then of a combine, 4096 x 7168 bf16, top-8 of 256, agreement check on.

    torchrun --standalone --nproc-per-node 2 docs/results/2026-11-22-session18/host_profile.py
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

import torch
import torch.distributed as dist

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
    buffer = deep_ep.Buffer(dist.group.WORLD, backend=os.environ.get("BACKEND", "cuda"))
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    for op, call in (
        ("cached dispatch", lambda: buffer.dispatch(x, handle=handle)),
        ("combine", lambda: buffer.combine(recv_x, handle)),
    ):
        for _ in range(20):
            call()
        torch.cuda.synchronize()
        dist.barrier()
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        for _ in range(200):
            call()
        profiler.disable()
        host = (time.perf_counter() - start) / 200
        torch.cuda.synchronize()
        plain = time.perf_counter()
        for _ in range(200):
            call()
        plain_host = (time.perf_counter() - plain) / 200
        torch.cuda.synchronize()
        if rank == 0:
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text)
            stats.sort_stats("tottime").print_stats(35)
            stats.sort_stats("cumulative").print_stats(35)
            print(f"== {op}: host time per call {plain_host * 1e6:.1f} us unprofiled, {host * 1e6:.1f} us profiled")
            print(text.getvalue())
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
