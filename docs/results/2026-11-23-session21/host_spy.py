"""Where the host's time goes in the cuda backend's cached dispatch and combine, sampled (run under py-spy):
every rank issues each op back to back for a few seconds (a device sync every 20 calls, so the launch queue
never fills and blocks), inside functions named after the op so the samples can be split by op.

    py-spy record --subprocesses --nonblocking -r 2000 -f raw -o spy.txt -- \
        torchrun --standalone --nproc-per-node 2 docs/results/2026-11-23-session21/host_spy.py

4096 tokens x 7168 bf16, top-8 of 256 experts (tools/bench.py's routing), 32 SMs, agreement check on (the
default); OPS (default cached,combine; also fresh) picks the ops. Also prints, unsampled runs aside, the
host's time per call of each op issued back to back.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

# DEEP_EP_ROOT: the tree to time (another checkout, for an A/B in one lease); by default this one.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.environ.get("DEEP_EP_ROOT", ROOT))

import deep_ep  # noqa: E402
from tools.bench import make_routing, make_x  # noqa: E402

SECONDS = float(os.environ.get("SECONDS_PER_OP", "3"))


def burst(call, seconds: float) -> float:
    """Host time per call, issued back to back for `seconds` (the same count on every rank)."""
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(20):
            call()
        torch.cuda.synchronize()
        calls += 20
        flag = torch.tensor([time.perf_counter() - start >= seconds], dtype=torch.int32, device="cuda")
        dist.all_reduce(flag)
        if flag.item():
            return (time.perf_counter() - start) / calls


def op_cached_dispatch(buffer, x, handle) -> float:
    return burst(lambda: buffer.dispatch(x, handle=handle), SECONDS)


def op_combine(buffer, recv_x, handle) -> float:
    return burst(lambda: buffer.combine(recv_x, handle), SECONDS)


def op_fresh_dispatch(buffer, x, args) -> float:
    return burst(lambda: buffer.dispatch(x, **args), SECONDS)


def main() -> None:
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    tokens, hidden, experts, topk = 4096, 7168, 256, 8
    topk_idx, weights = (t.to(device) for t in make_routing(rank, tokens, experts, topk))
    x = make_x(rank, tokens, hidden).to(device)
    buffer = deep_ep.Buffer(dist.group.WORLD, backend=os.environ.get("BACKEND", "cuda"))
    buffer.set_num_sms(32)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    for _ in range(20):  # warm-up: compile and allocate (a fresh dispatch too: it may have kernels of its own)
        buffer.dispatch(x, handle=handle)
        buffer.combine(recv_x, handle)
        buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    torch.cuda.synchronize()
    ops = os.environ.get("OPS", "cached,combine").split(",")
    times = {}
    if "cached" in ops:
        times["cached dispatch"] = op_cached_dispatch(buffer, x, handle)
    if "combine" in ops:
        times["combine"] = op_combine(buffer, recv_x, handle)
    if "fresh" in ops:
        times["fresh dispatch"] = op_fresh_dispatch(buffer, x, dict(topk_idx=topk_idx, topk_weights=weights, **layout))
    if rank == 0:
        print("host per call, back to back: " + ", ".join(f"{op} {t * 1e6:.1f} us" for op, t in times.items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
