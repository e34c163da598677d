"""Twentieth session: the overlapped combine (push_sum_kernel) against push + barrier + sum, in one process.

At 4096 x 7168 bf16, top-8 of 256 (bench.py's routing), for each variant: the combine's device time per call
(20 calls queued behind a GPU sleep, so the host cannot pace them; the events span the whole burst) and as issued
(back to back, host pacing included), median of 5 bursts, the slowest rank's. Variants: `num_sms` push programs
and `sum_sms` summing programs of the overlapped kernel, and the unfused path (push, barrier, ordered sum over
the whole GPU) at the same `num_sms`. Every variant's combined x is compared bit for bit with the unfused one's.

    torchrun --standalone --nproc-per-node 2 docs/results/2026-11-23-session20/overlap_probe.py
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.getcwd())
import deep_ep  # noqa: E402
from deep_ep.backends import cuda as cuda_backend  # noqa: E402
from tools.bench import make_routing, make_x  # noqa: E402

CALLS, BURSTS = 20, 5
VARIANTS = [  # (num_sms, sum_sms or None: the unfused path, tokens per sum tile, tiles per publish, sum stages)
    (32, None, 16, 4, 1),
    (32, 32, 16, 4, 1),
    (32, 32, 16, 4, 2),
    (32, 32, 16, 4, 3),
    (32, 16, 16, 4, 2),
    (32, 16, 16, 4, 3),
    (32, 16, 8, 4, 2),
    (32, 8, 16, 4, 3),
    (32, 32, 16, 2, 2),
    (24, 8, 16, 4, 3),
    (16, 16, 16, 4, 2),
    (16, 16, 16, 4, 3),
    (20, None, 16, 4, 1),
    (20, 12, 16, 4, 3),
    (20, 20, 16, 4, 2),
]


def timed(call, queued: bool) -> float:
    for _ in range(3):
        call()
    dist.all_reduce(torch.ones(1, device="cuda"))
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if queued:
        torch.cuda._sleep(200_000_000)
    start.record()
    for _ in range(CALLS):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / CALLS


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    tokens, hidden, experts, topk = 4096, 7168, 256, 8
    topk_idx, weights = (t.to(device) for t in make_routing(rank, tokens, experts, topk))
    x = make_x(rank, tokens, hidden).to(device)
    buffer = deep_ep.Buffer(dist.group.WORLD, backend="cuda")
    backend = buffer.runtime
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    bias = torch.randn(tokens, hidden, device=device).bfloat16()
    original_refusal = cuda_backend.CudaBackend._overlap_refusal
    results, reference = [], None
    for sms, sum_sms, sum_tokens, group, stages in VARIANTS:
        cuda_backend.SUM_TOKENS, cuda_backend.PUBLISH_TILES, cuda_backend.SUM_STAGES = sum_tokens, group, stages
        deep_ep.Buffer.set_num_sms(sms)
        if sum_sms is None:
            backend._overlap_refusal = lambda *args: "probe: the unfused path"
        else:
            backend._overlap_refusal = original_refusal.__get__(backend)
            backend.sum_sms = sum_sms
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w, bias=bias)
        with_bias = combined.view(torch.int16).clone()
        combined, _, _ = buffer.combine(recv_x, handle)
        bits = (combined.view(torch.int16).clone(), with_bias, combined_w.clone())
        if reference is None:
            reference = bits
        same = all(torch.equal(a, b) for a, b in zip(bits, reference))
        call = lambda: buffer.combine(recv_x, handle)  # noqa: E731
        queued = statistics.median(timed(call, True) for _ in range(BURSTS))
        issued = statistics.median(timed(call, False) for _ in range(BURSTS))
        results.append((sms, sum_sms, sum_tokens, group, stages, queued, issued, same))
    mine = torch.tensor([[q, i, float(s)] for _, _, _, _, _, q, i, s in results])
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        print(f"{world} ranks: combine us per call (max over ranks), {CALLS} calls, median of {BURSTS} bursts")
        print(
            f"{'num_sms':>8} {'sum_sms':>8} {'tokens':>7} {'group':>6} {'stages':>6} {'queued':>8} {'issued':>8}"
            "  same bits"
        )
        for i, (sms, sum_sms, sum_tokens, group, stages, _, _, _) in enumerate(results):
            queued = max(float(e[i, 0]) for e in everyone)
            issued = max(float(e[i, 1]) for e in everyone)
            same = all(bool(e[i, 2]) for e in everyone)
            label = str(sum_sms or "unfused")
            print(f"{sms:>8} {label:>8} {sum_tokens:>7} {group:>6} {stages:>6} {queued:8.1f} {issued:8.1f}  {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
