"""Capture low_latency_dispatch + low_latency_combine in a CUDA graph and replay it on new inputs; the
replay must equal eager calls bit for bit (valid rows). Needs GPUs and NCCL:

    python3 tools/ll_graph_check.py --world 2 [--backend cuda]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deep_ep import Buffer  # noqa: E402
from deep_ep.testing import run_ranks  # noqa: E402
from deep_ep.testing.workloads import make_workload  # noqa: E402


def _check(rank: int, world: int, hidden: int, tokens: int, experts: int, backend: str) -> str:
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True, backend=backend)
    inputs = [make_workload(world, tokens, hidden, 8, experts, seed=s, routing="sparse") for s in (1, 2)]
    x = inputs[0].x[rank].to(device)
    idx = inputs[0].topk_idx[rank].to(device)
    w = inputs[0].topk_weights[rank].to(device)

    def pair():
        recv, count, handle, _, _ = buffer.low_latency_dispatch(x, idx, tokens, experts, use_fp8=False)
        out, _, _ = buffer.low_latency_combine(recv * 2, idx, w, handle)
        return recv, count, out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pair()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv, count, out = pair()
    results = []
    for case in inputs:  # replay on new inputs copied into the captured ones
        x.copy_(case.x[rank])
        idx.copy_(case.topk_idx[rank])
        w.copy_(case.topk_weights[rank])
        graph.replay()
        torch.cuda.synchronize()
        got = (recv.clone(), count.clone(), out.clone())
        eager = pair()
        for e, n in enumerate(eager[1].tolist()):
            assert torch.equal(got[0][e, :n], eager[0][e, :n]), f"recv_x of expert {e}"
        assert torch.equal(got[1], eager[1]) and torch.equal(got[2].view(torch.int16), eager[2].view(torch.int16))
        results.append(int(eager[1].sum()))
    return f"rank {rank} ({buffer.backend}): graph replay == eager for {len(results)} inputs (rows {results})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--backend", default="auto", help="deep_ep backend name")
    args = parser.parse_args()
    for line in run_ranks(
        args.world, _check, args.hidden, args.tokens, args.experts, args.backend, backend="nccl", timeout=240
    ):
        print(line)
    print("RESULT: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
