"""Host time of single operations on the cuda backend's hot paths (2 ranks, 4096 x 7168 bf16 rows), medians of 200
calls with a device sync every 20: torch copy_ into a symmetric-memory workspace view (the cached dispatch's
copy-in) and into an ordinary CUDA tensor, the symmetric-memory barrier, torch.empty, a one-op view.

    torchrun --standalone --nproc-per-node 2 docs/results/2026-11-23-session21/host_costs.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from deep_ep.backends.peer_memory import SymmetricWorkspace  # noqa: E402


def host_time(call, count: int = 200) -> float:
    times = []
    for i in range(count):
        if i % 20 == 0:
            torch.cuda.synchronize()
            dist.barrier()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main() -> None:
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    rows, width = 4096, 7168 * 2
    x = torch.randn(rows, width // 2, device=device).bfloat16()
    src = x.view(torch.uint8)
    workspace = SymmetricWorkspace(dist.group.WORLD, device)
    workspace.ensure(2 * rows * width)
    area = workspace.local.as_strided((rows, width), (width, 1), 0)
    plain = torch.empty(rows, width, dtype=torch.uint8, device=device)
    results = {
        "copy_ into workspace view": host_time(lambda: area.copy_(src)),
        "copy_ into a CUDA tensor": host_time(lambda: plain.copy_(src)),
        "symmetric-memory barrier": host_time(lambda: workspace.barrier(60.0)),
        "torch.empty 4096 x 7168 bf16": host_time(
            lambda: torch.empty(rows, width // 2, dtype=torch.bfloat16, device=device)
        ),
        "as_strided view": host_time(lambda: workspace.local.as_strided((rows, width), (width, 1), 0)),
        "x.view(torch.uint8)": host_time(lambda: x.view(torch.uint8)),
        "torch.cuda.current_stream()": host_time(torch.cuda.current_stream),
        "torch.cuda.current_device()": host_time(torch.cuda.current_device),
    }
    if rank == 0:
        for name, us in results.items():
            print(f"{name:32s} {us:8.1f} us")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
