"""The five cases of tests/test_cuda_backend.py::test_review_cases_on_the_emulated_backend on GPUs: `cuda` against
`reference` over NCCL, CUDA tensors, bit for bit (the async case too, though only the CPU defers its unpacking).

    torchrun --standalone --nproc-per-node 2 docs/results/2026-11-23-session21/review_cases_gpu.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from deep_ep import Buffer  # noqa: E402
from deep_ep.testing.compare import first_mismatch  # noqa: E402


def cases(backend: str, device: torch.device, rank: int) -> dict[str, list[torch.Tensor] | str]:
    gen = torch.Generator().manual_seed(rank)
    out: dict[str, list[torch.Tensor] | str] = {}
    x16 = torch.randn(6, 16, generator=gen).bfloat16().to(device)
    odd = torch.zeros(6 * 16 + 1, dtype=torch.bfloat16, device=device)[1:].view(6, 16)
    odd.copy_(x16)
    big = torch.randn(6, 512, generator=gen).bfloat16().to(device)
    small = torch.randn(6, 4, generator=gen).bfloat16().to(device)
    buffer = Buffer(dist.group.WORLD, backend=backend)
    none = torch.full((6, 2), -1, dtype=torch.long, device=device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(none, 4)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    try:  # every case runs even where an earlier one raised (on the tree before the fixes)
        got = buffer.dispatch(x16, topk_idx=none, topk_weights=torch.ones(6, 2, device=device), **layout)
        out["nothing sent"] = [got[0], got[1], got[2]]
    except Exception as error:
        out["nothing sent"] = f"{type(error).__name__}: {error}"
    idx = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(t))[:2] for t in range(6)])
    idx = idx.to(device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    try:
        recv_x, _, _, _, handle, _ = buffer.dispatch(odd, **layout)
        shifted = torch.zeros(recv_x.numel() + 1, dtype=recv_x.dtype, device=device)[1:].view(recv_x.shape)
        shifted.copy_(recv_x)
        out["odd offsets"] = [recv_x, buffer.combine(shifted, handle)[0]]
    except Exception as error:
        out["odd offsets"] = f"{type(error).__name__}: {error}"
    weights = [torch.rand(6, 2, generator=torch.Generator().manual_seed(i)).to(device) for i in range(3)]
    calls = [
        buffer.dispatch(x16 * (i + 1), topk_idx=idx, topk_weights=weights[i], async_finish=True, **layout)
        for i in range(3)
    ]
    for call in calls[::-1]:
        call[5].current_stream_wait()
    out["async fields"] = [calls[0][1], calls[0][2], calls[0][4][3]]
    ll = Buffer(dist.group.WORLD, low_latency_mode=True, backend=backend)
    for experts, fill in ((2, 0), (2, 0), (4, -1)):
        topk = torch.full((4, 1), fill, dtype=torch.long, device=device)
        x = torch.randn(4, 128, generator=torch.Generator().manual_seed(experts)).bfloat16().to(device)
        recv, count, ll_handle, _, _ = ll.low_latency_dispatch(x, topk, 4, experts, use_fp8=False)
        ll.low_latency_combine(recv, topk, torch.ones(4, 1, device=device), ll_handle)
    out["low-latency layout change"] = [count]
    one, other = Buffer(dist.group.WORLD, backend=backend), Buffer(dist.group.WORLD, backend=backend)
    first = one.dispatch(big, **layout)[0]
    second = other.dispatch(small, **layout)[0]
    out["two Buffers"] = [first, second, one.dispatch(big, **layout)[0]]
    torch.cuda.synchronize()
    return {case: got if isinstance(got, str) else [t.clone().cpu() for t in got] for case, got in out.items()}


def main() -> None:
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    want, got = cases("reference", device, rank), cases("cuda", device, rank)
    failed = 0
    for case in want:
        if isinstance(got[case], str):
            problems = [got[case][:150]]
        else:
            problems = [p for p in (first_mismatch(g, w) for g, w in zip(got[case], want[case])) if p]
        failed += bool(problems)
        print(f"rank {rank}: {case}: {'PASS' if not problems else 'FAIL ' + '; '.join(problems)}")
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
