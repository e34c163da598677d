"""Host time to launch the fresh dispatch's count kernel (Triton, 18 arguments) against one small torch
operation, on one GPU, 4096 tokens x 2 ranks, 16 channels: what a Triton launch costs this host.

    python3 docs/results/2026-11-23-session25/launch_bench.py
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from deep_ep.kernels import triton_fresh_dispatch as kernels  # noqa: E402

device = torch.device("cuda", 0)
tokens, ranks, channels, experts, topk = 4096, 2, 16, 256, 8
in_rank = torch.rand(tokens, ranks, device=device) < 0.9
per_rank = in_rank.sum(0)
per_expert = torch.zeros(experts, dtype=torch.int64, device=device)
topk_idx = torch.randint(0, experts, (tokens, topk), device=device)
row = torch.full((ranks * (1 + channels) + experts + 3,), -1, dtype=torch.int32, device=device)


def launch() -> None:
    kernels.count_kernel[(channels,)](
        in_rank.view(torch.uint8), per_rank, per_expert, topk_idx, row, tokens, ranks, 1, 1, experts, 1, topk, 1,
        tokens // channels, channels, R=ranks, R_POW2=2, K=topk, K_POW2=8, BLOCK=256,
    )  # fmt: skip


def small_op() -> None:
    row.fill_(-1)


results = {"count_kernel launch": [], "torch fill_": []}
for _ in range(7):
    for name, way in (("count_kernel launch", launch), ("torch fill_", small_op)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(2000):
            way()
        results[name].append((time.perf_counter() - start) / 2000 * 1e6)
        torch.cuda.synchronize()
for name, times in results.items():
    times = sorted(times[1:])
    print(f"{name}: median {times[len(times) // 2]:.1f} us per call, range {times[0]:.1f}-{times[-1]:.1f}")
