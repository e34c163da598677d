"""The reference's cached-dispatch transfer on the first and last rank (4096 x 7168 bf16, top-8 of 256, bench.py's
routing): the rows for the peers gathered, all_to_all_single started on NCCL's stream, then the own rows gathered
into the output beside it on the caller's stream, by

- `index_select` (main before this session: fills every SM, so NCCL's kernel usually waits for it),
- 4 index_selects (the fourteenth session's `main+4chunks`),
- the Triton row gather on 4 / 8 / 16 / 32 / 64 programs (`deep_ep/kernels/triton_row_gather.py`).

The middle ranks do as the library does (gather all rows, own included, then the all-to-all). Two more variants
(`list, ...`) keep every rank's own rows home, the middle ranks' too: the peers' blocks travel in a list
all_to_all and the own rows are gathered beside it by index_select or by the Triton gather on 16 programs. Same
bytes in every variant (checked on every rank). Per call: device time of 30 calls back to back (events on the
caller's stream), median of 3 bursts, the slowest rank's; and the host time per call. Twice: as issued, and with
each burst queued behind a GPU sleep (the device's time alone, where the host would otherwise pace the calls).

    torchrun --standalone --nproc-per-node 4 docs/results/2026-11-22-session15/own_rows_few_sms.py
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
from deep_ep.kernels import triton_row_gather  # noqa: E402
from deep_ep.routing import _words, gather_rows  # noqa: E402
from tools.bench import make_routing, make_x  # noqa: E402

CALLS, BURSTS = 30, 3


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    tokens, hidden, experts, topk = 4096, 7168, 256, 8
    topk_idx, weights = (t.to(device) for t in make_routing(rank, tokens, experts, topk))
    x = make_x(rank, tokens, hidden).to(device)
    buffer = deep_ep.Buffer(dist.group.WORLD, backend="reference")
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    expected, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    route = handle.route
    rows = x.view(torch.uint8)
    send_splits, recv_splits = list(route.send_splits), list(route.recv_splits)
    own_begin = sum(send_splits[:rank])
    own_end = own_begin + send_splits[rank]
    own_tokens = route.send_tokens[own_begin:own_end]
    to_peers = torch.cat([route.send_tokens[:own_begin], route.send_tokens[own_end:]])
    ends = rank in (0, world - 1)

    def index_select(own: torch.Tensor, chunks: int = 1) -> None:
        step = -(-own_tokens.shape[0] // chunks)
        for begin in range(0, own_tokens.shape[0], step):
            gather_rows(rows, own_tokens[begin : begin + step], out=own[begin : begin + step])

    def triton(own: torch.Tensor, programs: int) -> None:
        triton_row_gather.gather_rows(_words(rows), own_tokens, _words(own), programs)

    def transfer(own_gather) -> torch.Tensor:
        out = torch.empty_like(expected)
        flat = out.view(torch.uint8)
        if not ends:
            send = torch.empty((route.send_tokens.shape[0], rows.shape[1]), dtype=torch.uint8, device=device)
            gather_rows(rows, route.send_tokens, out=send)
            dist.all_to_all_single(flat, send, recv_splits, send_splits, async_op=True).wait()
            return out
        send = torch.empty((to_peers.shape[0], rows.shape[1]), dtype=torch.uint8, device=device)
        gather_rows(rows, to_peers, out=send)
        n = send_splits[rank]
        others = flat[n:] if rank == 0 else flat[: flat.shape[0] - n]
        own = flat[:n] if rank == 0 else flat[flat.shape[0] - n :]
        r = [0 if s == rank else c for s, c in enumerate(recv_splits)]
        s = [0 if d == rank else c for d, c in enumerate(send_splits)]
        work = dist.all_to_all_single(others, send, r, s, async_op=True)
        own_gather(own)
        work.wait()
        return out

    def listed(own_gather) -> torch.Tensor:
        # Every rank, middle ones too, keeps its own rows home: the peers' blocks in a list all-to-all (torch's
        # all_to_all; the thirteenth session's `middle-ranks` branch), the own rows gathered beside it.
        out = torch.empty_like(expected)
        flat = out.view(torch.uint8)
        send = torch.empty((to_peers.shape[0], rows.shape[1]), dtype=torch.uint8, device=device)
        gather_rows(rows, to_peers, out=send)
        outs = list(flat.split(recv_splits))
        own, outs[rank] = outs[rank], flat[:0]
        ins = list(send.split([0 if d == rank else c for d, c in enumerate(send_splits)]))
        work = dist.all_to_all(outs, ins, async_op=True)
        own_gather(own)
        work.wait()
        return out

    variants = {
        "index_select": lambda: transfer(index_select),
        "4 index_selects": lambda: transfer(lambda own: index_select(own, 4)),
        **{f"triton {p} SMs": (lambda p=p: transfer(lambda own: triton(own, p))) for p in (4, 8, 16, 32, 64)},
        "list, index_select": lambda: listed(index_select),
        "list, triton 16": lambda: listed(lambda own: triton(own, 16)),
    }
    for name, call in variants.items():
        got = call()
        torch.cuda.synchronize()
        same = torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
        flags = torch.tensor([int(same)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        if rank == 0:
            print(f"{name}: {'same bytes on every rank' if flags.item() else 'MISMATCH on some rank'}", flush=True)
    for queued in (False, True):
        measure(variants, queued, rank, world, device)
    dist.destroy_process_group()


def measure(variants: dict, queued: bool, rank: int, world: int, device: torch.device) -> None:
    """queued: the GPU sleeps while the host issues the burst, so the figure is the device's alone (no host
    pacing); else calls run as issued."""
    results = {name: [] for name in variants}
    host = {name: [] for name in variants}
    for _ in range(BURSTS):
        for name, call in variants.items():  # interleaved, so drift hits every variant alike
            for _ in range(5):
                call()
            dist.all_reduce(torch.ones(1, device=device))
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if queued:
                torch.cuda._sleep(100_000_000)  # ~50 ms at H200 clocks: longer than issuing the burst
            start.record()
            t0 = time.perf_counter()
            for _ in range(CALLS):
                call()
            host[name].append((time.perf_counter() - t0) * 1e6 / CALLS)
            end.record()
            end.synchronize()
            results[name].append(start.elapsed_time(end) * 1e3 / CALLS)
    mine = torch.tensor(
        [statistics.median(v) for v in results.values()] + [statistics.median(v) for v in host.values()], device=device
    )
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    if rank == 0:
        how = "queued behind a GPU sleep (device time alone)" if queued else "as issued"
        print(f"{world} ranks; us per cached-dispatch transfer, {how}, {CALLS} calls back to back, median of {BURSTS}:")
        for i, name in enumerate(variants):
            per_rank = " ".join(f"{float(e[i]):7.1f}" for e in everyone)
            issue = " ".join(f"{float(e[len(variants) + i]):6.1f}" for e in everyone)
            print(f"  {name:18s} max {max(float(e[i]) for e in everyone):7.1f}   by rank: {per_rank}  host: {issue}")


if __name__ == "__main__":
    main()
