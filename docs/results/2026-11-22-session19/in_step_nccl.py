"""Nineteenth session: the ranks stay in step after an error that only some ranks see, over NCCL on GPUs, for
the reference and the cuda backend (tests/test_in_step.py checks the same on gloo). Every round uses data
unique to it and is compared with the executable spec bit for bit, so a call paired with another round's call
on a peer would fail.

    python3 docs/results/2026-11-22-session19/in_step_nccl.py --world 2 --backend cuda
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import reference  # noqa: E402
from deep_ep import Buffer, CollectiveMismatchError  # noqa: E402
from deep_ep.testing import run_ranks  # noqa: E402
from deep_ep.testing.compare import assert_bit_equal  # noqa: E402
from deep_ep.testing.workloads import make_workload  # noqa: E402

TOKENS, HIDDEN, TOPK, CAP = 64, 7168, 8, 64


def _check(rank: int, world: int, backend: str) -> str:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    experts = 8 * world
    w = make_workload(world, TOKENS, HIDDEN, TOPK, experts, seed=3)
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True, backend=backend)
    buffer.comm_timeout = 60.0
    idx, weights = w.topk_idx[rank].to(device), w.topk_weights[rank].to(device)
    lay = reference.layout(w.topk_idx, experts)
    in_ranks = [q["is_token_in_rank"] for q in lay]
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    last = rank == world - 1

    def round_(step: int) -> tuple:
        xs = [x * (step + 2) for x in w.x]
        x = xs[rank].to(device)
        spec = reference.dispatch(
            xs, in_ranks, [q["num_tokens_per_expert"] for q in lay], w.topk_idx, w.topk_weights, experts
        )
        recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=weights, **layout)
        assert_bit_equal(f"recv_x {step}", recv_x.cpu(), spec[rank]["recv_x"])
        assert_bit_equal(f"cached {step}", buffer.dispatch(x, handle=handle)[0].cpu(), spec[rank]["recv_x"])
        combined = buffer.combine(recv_x, handle)[0]
        want = reference.combine([s["recv_x"] for s in spec], in_ranks)[rank]["combined_x"]
        assert_bit_equal(f"combined {step}", combined.cpu(), want)
        recv, count, ll_handle, _, _ = buffer.low_latency_dispatch(x, idx, CAP, experts, use_fp8=False)
        ll = reference.low_latency_dispatch(xs, w.topk_idx, CAP, experts, use_fp8=False)
        assert_bit_equal(f"ll count {step}", count.cpu(), ll[rank]["recv_count"])
        for e, n in enumerate(count.tolist()):
            assert_bit_equal(f"ll recv_x {step}", recv[e, :n].cpu(), ll[rank]["recv_x"][e, :n])
        out = buffer.low_latency_combine(recv, idx, weights, ll_handle)[0]
        ll_want = reference.low_latency_combine([s["recv_x"] for s in ll], w.topk_idx, w.topk_weights, CAP)[rank]
        assert_bit_equal(f"ll combined {step}", out.cpu(), ll_want)
        return x, recv_x, handle, recv, ll_handle

    def expect(what: str, error: type, call) -> str:
        try:
            call()
        except error as e:
            return f"{what}: {type(e).__name__}: {str(e)[:90]}"
        raise AssertionError(f"{what}: no {error.__name__}")

    lines = []
    x, recv_x, handle, recv, ll_handle = round_(0)
    mine = TypeError if last else CollectiveMismatchError
    lines.append(
        expect(
            "dispatch, last rank's topk_weights float64",
            mine,
            lambda: buffer.dispatch(x, topk_idx=idx, topk_weights=weights.double() if last else weights, **layout),
        )
    )
    x, recv_x, handle, recv, ll_handle = round_(1)
    lines.append(
        expect(
            "combine, last rank's bias of the wrong shape",
            ValueError if last else CollectiveMismatchError,
            lambda: buffer.combine(recv_x, handle, bias=x[:-1] if last else None),
        )
    )
    x, recv_x2, handle2, recv, ll_handle = round_(2)
    lines.append(
        expect(
            "combine, rank 0 with an older handle",
            CollectiveMismatchError,
            lambda: buffer.combine(recv_x if rank == 0 else recv_x2, handle if rank == 0 else handle2),
        )
    )
    x, recv_x, handle, recv, ll_handle = round_(3)
    lines.append(
        expect(
            "low-latency dispatch, last rank over T",
            ValueError if last else CollectiveMismatchError,
            lambda: buffer.low_latency_dispatch(x, idx, TOKENS // 2 if last else CAP, experts, use_fp8=False),
        )
    )
    round_(4)
    return f"rank {rank} ({buffer.backend}): 5 rounds == spec;\n  " + "\n  ".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dist-backend", default="nccl", help="gloo runs it on the CPU (a check of this script)")
    args = parser.parse_args()
    for line in run_ranks(args.world, _check, args.backend, backend=args.dist_backend, timeout=300):
        print(line)
    print("RESULT: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
