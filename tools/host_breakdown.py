"""Where the host's time goes in one call of the cuda or reference backend, without a profiler: the backend's pieces
(cuda: the push kernel's Triton launch, the device barrier, the copy-out, the reduction; reference: the row
gathers (the own rows' few-SM gather too), the all-to-all's issue, the ordered sum's launch) are wrapped with
perf_counter, and rank 0 prints, per piece, when it starts after the call began and how long the host spends in it
(medians over 30 calls, each after a barrier and a device sync, as tools/bench.py times them), for a fresh
dispatch, a cached dispatch and a combine; then the host's time per call when ten calls are issued back to back.

    CHECK=0 torchrun --standalone --nproc-per-node 4 tools/host_breakdown.py   # CHECK=1: with the agreement check
    BACKEND=reference CHECK=1 torchrun --standalone --nproc-per-node 4 tools/host_breakdown.py

4096 tokens x 7168 bf16, top-8 of 256 experts (tools/bench.py's routing). Needs a CUDA host (for the cuda
backend, one where it is available). Results: docs/results/2026-11-22-4xh200-session4/ (cuda),
docs/results/2026-11-22-session12/ (reference).
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton.runtime.jit as triton_jit  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep import comm, packing, routing  # noqa: E402
from deep_ep.backends import base, peer_memory, reference  # noqa: E402
from deep_ep.backends import cuda as cuda_backend  # noqa: E402
from deep_ep.kernels import row_gather  # noqa: E402
from tools.bench import make_routing, make_x  # noqa: E402

MARKS: list[tuple[str, float, float]] = []

# (owner, attribute, label) of the pieces timed: the façade's and the fresh dispatch's, then each backend's own.
COMMON_PIECES = (
    (deep_ep.Buffer, "_agree", "agreement check"),
    (base.DispatchArgs, "expert_id_range", "expert id range"),
    (comm.Comm, "all_gather_host", "count exchange"),
    (routing.Route, "exact", "Route.exact"),
    (reference, "_send_head", "_send_head"),
    (reference.ReferenceBackend, "dispatch", "backend.dispatch"),
    (comm.Pending, "wait", "Pending.wait"),
    (triton_jit.JITFunction, "run", "triton launch"),
    (reference.ReferenceBackend, "cached_dispatch", "backend.cached_dispatch"),
)
CUDA_PIECES = (
    (cuda_backend.CudaBackend, "_forward", "backend._forward"),
    (cuda_backend, "dispatch_push_plan", "dispatch_push_plan"),
    (cuda_backend, "combine_push_plan", "combine_push_plan"),
    (packing.RowFormat, "unpack_into", "unpack_into"),
    (peer_memory.SymmetricWorkspace, "barrier", "barrier"),
    (cuda_backend.CudaBackend, "_push", "_push"),
    (cuda_backend.CudaBackend, "_pull", "_pull"),
    (cuda_backend.CudaBackend, "combine", "backend.combine"),
    (cuda_backend, "ordered_gather_sum", "ordered_gather_sum"),
    (torch.Tensor, "copy_", "copy_"),
)
REFERENCE_PIECES = (
    (reference.ReferenceBackend, "combine", "backend.combine"),
    (routing.Route, "forward", "Route.forward"),
    (routing.Route, "backward", "Route.backward"),
    (routing, "gather_rows", "gather_rows"),
    (row_gather, "gather_rows_beside", "gather_rows_beside"),
    (comm.Comm, "all_to_all", "Comm.all_to_all"),
    (dist, "all_to_all_single", "dist.all_to_all_single"),
    (reference, "_sum_returned", "_sum_returned"),
    (reference, "ordered_gather_sum", "ordered_gather_sum"),
    (reference.ReferenceBackend, "_empty", "_empty"),
)


def time_calls(owner: object, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        MARKS.append((label, start, time.perf_counter()))
        return result

    setattr(owner, name, timed)


def main() -> None:
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    backend = os.environ.get("BACKEND", "cuda")
    for owner, name, label in (*COMMON_PIECES, *(CUDA_PIECES if backend == "cuda" else REFERENCE_PIECES)):
        time_calls(owner, name, label)
    tokens, hidden, experts, topk = 4096, 7168, 256, 8
    topk_idx, weights = (t.to(device) for t in make_routing(rank, tokens, experts, topk))
    x = make_x(rank, tokens, hidden).to(device)
    buffer = deep_ep.Buffer(dist.group.WORLD, backend=backend)
    buffer.check_agreement = os.environ.get("CHECK", "0") == "1"
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    for op, call in (
        ("dispatch", lambda: buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)),
        ("cached dispatch", lambda: buffer.dispatch(x, handle=handle)),
        ("combine", lambda: buffer.combine(recv_x, handle)),
    ):
        pieces: dict[str, list[tuple[float, float]]] = {}
        for round_ in range(40):
            flag = torch.ones(1, device=device)
            dist.all_reduce(flag)
            torch.cuda.synchronize()
            MARKS.clear()
            start = time.perf_counter()
            call()
            pieces.setdefault("TOTAL", []).append((0.0, time.perf_counter() - start))
            torch.cuda.synchronize()
            if round_ < 10:  # warm-up
                pieces.clear()
                continue
            seen: dict[str, int] = {}
            for label, begin, end in MARKS:
                seen[label] = seen.get(label, 0) + 1
                pieces.setdefault(f"{label}#{seen[label]}", []).append((begin - start, end - begin))
        # Issued back to back, as the benchmarks time them: the host's time per call, without the wrappers'.
        bursts = []
        for _ in range(10):
            dist.all_reduce(torch.ones(1, device=device))
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                call()
            bursts.append((time.perf_counter() - start) / 10)
        torch.cuda.synchronize()
        if rank == 0:
            print(
                f"== {op} (check_agreement={buffer.check_agreement}): per piece, median start after the call began "
                f"and median host time, us; back to back (wrapped): {statistics.median(bursts) * 1e6:.1f} us per call"
            )
            for label, values in sorted(pieces.items(), key=lambda kv: statistics.median(v[0] for v in kv[1])):
                began = statistics.median(v[0] for v in values) * 1e6
                took = statistics.median(v[1] for v in values) * 1e6
                print(f"   {label:30s} start {began:8.1f}  took {took:8.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
