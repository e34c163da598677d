"""Host time per phase of a fresh dispatch issued back to back (inclusive wall time of wrapped functions,
perf_counter, no added synchronisation), on CUDA (NCCL, `cuda` or `reference` backend) or on the CPU (gloo).

    torchrun --standalone --nproc-per-node 2 docs/results/2026-11-23-session25/fresh_phases.py

Env: DEVICE (cuda|cpu, default cuda), BACKEND (default cuda on GPUs, reference on the CPU), T (tokens per rank,
default 4096 on GPUs, 512 on the CPU), CALLS (default 400), DEEP_EP_ROOT (the tree to time; default this one).
Rank 0 prints each phase's host time per call; nested phases are indented under the phase that calls them.
"""

from __future__ import annotations

import collections
import os
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.environ.get("DEEP_EP_ROOT", ROOT))

import deep_ep  # noqa: E402
from deep_ep import buffer, comm, packing  # noqa: E402
from deep_ep.backends import reference  # noqa: E402
from tools.bench import make_routing, make_x  # noqa: E402

SPENT: collections.Counter = collections.Counter()


def wrap(owner, name: str, label: str) -> None:
    if not hasattr(owner, name):
        return
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - start

    setattr(owner, name, timed)


def instrument() -> None:
    from deep_ep.backends import cuda

    wrap(buffer.Buffer, "dispatch", "0 Buffer.dispatch")
    wrap(buffer, "check_agreement", "1 agreement")
    wrap(reference.ReferenceBackend, "dispatch", "1 backend dispatch")
    for owner, name in ((cuda.CudaBackend, "_count_row"), (reference.ReferenceBackend, "_count_row")):
        wrap(owner, name, f"2 {owner.__name__}.{name}")
    wrap(comm.Comm, "all_gather_host", "2 count exchange (host read + board)")
    wrap(reference, "_bad_input_flags", "2 bad-input flags")
    wrap(reference, "_host_prefix_matrices", "2 prefix matrices")
    wrap(cuda.CudaBackend, "_exact_route", "2 route (cuda)")
    wrap(reference.ReferenceBackend, "_exact_route", "2 route (reference)")
    wrap(packing.RowFormat, "of", "2 RowFormat.of")
    wrap(packing.RowFormat, "pack", "2 RowFormat.pack")
    wrap(cuda.CudaBackend, "_forward", "2 forward (cuda)")
    wrap(reference.ReferenceBackend, "_forward", "2 forward (reference)")
    wrap(cuda.CudaBackend, "_push", "3 push (workspace, launch, barrier)")
    wrap(cuda.CudaBackend, "_launch", "4 push kernel launch")
    wrap(comm.Pending, "wait", "1 pending.wait (unpack)")
    wrap(cuda.CudaBackend, "_unpack", "2 unpack (cuda)")
    wrap(buffer.Buffer, "_finish", "1 Buffer._finish")


def main() -> None:
    rank = int(os.environ["RANK"])
    on_gpu = os.environ.get("DEVICE", "cuda") == "cuda"
    if on_gpu:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    tokens = int(os.environ.get("T", "4096" if on_gpu else "512"))
    hidden, experts, topk = 7168, 256, 8
    topk_idx, weights = (t.to(device) for t in make_routing(rank, tokens, experts, topk))
    x = make_x(rank, tokens, hidden).to(device)
    buf = deep_ep.Buffer(dist.group.WORLD, backend=os.environ.get("BACKEND", "cuda" if on_gpu else "reference"))
    buf.set_num_sms(32)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for _ in range(20):
        buf.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    sync()
    instrument()
    calls = int(os.environ.get("CALLS", "400"))
    start = time.perf_counter()
    for i in range(calls):
        buf.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
        if i % 20 == 19:
            sync()
    sync()
    wall = (time.perf_counter() - start) / calls
    if rank == 0:
        backend = getattr(buf, "backend", "")
        print(f"fresh dispatch, {tokens} tokens, {backend}: {wall * 1e6:.1f} us per call")
        for label, seconds in sorted(SPENT.items()):
            depth, name = label.split(" ", 1)
            print(f"{'  ' * int(depth)}{name}: {seconds / calls * 1e6:.1f} us")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
