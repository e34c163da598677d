"""Eighteenth session: session 15's queued.py for the cuda backend (BACKEND, default cuda) at SMS SMs (default 32):
the cached dispatch and the combine (4096 x 7168 bf16, top-8 of 256, bench.py's routing) per burst of 20 calls, as
issued (bench.py's back-to-back figure, host pacing included) and queued behind a GPU sleep (the device's time per
call alone), and the host's time per call; median of 5 bursts, the slowest rank's.

    torchrun --standalone --nproc-per-node 2 docs/results/2026-11-22-session18/queued_cuda.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.getcwd())
import deep_ep  # noqa: E402
from tools.bench import make_routing, make_x  # noqa: E402

CALLS, BURSTS = 20, 5


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    tokens, hidden, experts, topk = 4096, 7168, 256, 8
    deep_ep.Buffer.set_num_sms(int(os.environ.get("SMS", "32")))
    topk_idx, weights = (t.to(device) for t in make_routing(rank, tokens, experts, topk))
    x = make_x(rank, tokens, hidden).to(device)
    buffer = deep_ep.Buffer(dist.group.WORLD, backend=os.environ.get("BACKEND", "cuda"))
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    ops = {
        "cached dispatch": lambda: buffer.dispatch(x, handle=handle),
        "combine": lambda: buffer.combine(recv_x, handle),
    }
    names = [f"{op} {how}" for op in ops for how in ("as issued", "queued")]
    device_us = {name: [] for name in names}
    host_us = {name: [] for name in names}
    for _ in range(BURSTS):
        for op, call in ops.items():
            for how in ("as issued", "queued"):
                for _ in range(3):
                    call()
                dist.all_reduce(torch.ones(1, device=device))
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if how == "queued":
                    torch.cuda._sleep(200_000_000)  # ~100 ms: longer than the host needs to issue the burst
                start.record()
                t0 = time.perf_counter()
                for _ in range(CALLS):
                    call()
                host_us[f"{op} {how}"].append((time.perf_counter() - t0) * 1e6 / CALLS)
                end.record()
                end.synchronize()
                device_us[f"{op} {how}"].append(start.elapsed_time(end) * 1e3 / CALLS)
    mine = torch.tensor(
        [statistics.median(device_us[n]) for n in names] + [statistics.median(host_us[n]) for n in names]
    )
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        print(f"{world} ranks, {os.getcwd()}: us per call, {CALLS} back to back, median of {BURSTS} bursts")
        for i, name in enumerate(names):
            per_rank = " ".join(f"{float(e[i]):6.1f}" for e in everyone)
            host = " ".join(f"{float(e[len(names) + i]):6.1f}" for e in everyone)
            print(f"  {name:26s} max {max(float(e[i]) for e in everyone):6.1f}  by rank: {per_rank}  host: {host}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
