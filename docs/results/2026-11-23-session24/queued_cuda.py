"""The cuda backend's combine sending its blocks with the copy engines against the push kernel
(DEEP_EP_CUDA_COPY_ENGINES=1 / 0, read when a Buffer is made), 4096 x 7168 bf16, top-8 of 256 (bench.py's routing),
at NUM_SMS (default 32). First the bits: each Buffer's combine (and with top-k weights) against the reference
backend's, on every rank. Then per burst of 20 calls, the device's time per call when queued behind a GPU sleep
(the host issues the whole burst first) and as issued, and the host's time per call; median of 7 bursts, the
slowest rank's. Bursts of the two Buffers alternate.

    torchrun --standalone --nproc-per-node 2 docs/results/2026-11-23-session24/queued_cuda.py
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

CALLS, BURSTS = 20, 7


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    deep_ep.Buffer.set_num_sms(int(os.environ.get("NUM_SMS", "32")))
    tokens, hidden, experts, topk = 4096, 7168, 256, 8
    topk_idx, weights = (t.to(device) for t in make_routing(rank, tokens, experts, topk))
    x = make_x(rank, tokens, hidden).to(device)
    buffers = {}
    for name, value in (("copy engines", "1"), ("push kernel", "0")):
        os.environ["DEEP_EP_CUDA_COPY_ENGINES"] = value
        buffers[name] = deep_ep.Buffer(dist.group.WORLD, backend="cuda")
    reference = deep_ep.Buffer(dist.group.WORLD, backend="reference")
    calls, same = {}, True
    expected = None
    for name, buffer in [("reference", reference), *buffers.items()]:
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
        y = (recv_x.float() * 1.5).bfloat16()
        got = [buffer.combine(y, handle)[0], *buffer.combine(y, handle, topk_weights=recv_w)[:2]]
        if expected is None:
            expected = got
        else:
            same &= all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, expected))
        if name != "reference":
            calls[name] = lambda b=buffer, r=recv_x, h=handle: b.combine(r, h)
    flag = torch.tensor([int(same)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(
            f"combine (x; x and top-k weights), copy engines and push kernel vs reference: "
            f"{'same bits on every rank' if flag.item() else 'MISMATCH'}",
            flush=True,
        )
    names = [f"{op} {how}" for op in calls for how in ("queued", "as issued")]
    device_us = {name: [] for name in names}
    host_us = {name: [] for name in names}
    for _ in range(BURSTS):
        for op, call in calls.items():
            for how in ("queued", "as issued"):
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
        print(
            f"{world} ranks, num_sms {deep_ep.Buffer.num_sms}: combine, us per call, {CALLS} back to back, "
            f"median of {BURSTS} bursts"
        )
        for i, name in enumerate(names):
            per_rank = " ".join(f"{float(e[i]):6.1f}" for e in everyone)
            host = " ".join(f"{float(e[len(names) + i]):6.1f}" for e in everyone)
            print(f"  {name:30s} max {max(float(e[i]) for e in everyone):6.1f}  by rank: {per_rank}  host: {host}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
