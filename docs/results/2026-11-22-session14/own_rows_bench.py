"""The reference's cached dispatch transfer (4096 x 7168 bf16, top-8 of 256, bench.py's routing), in variants that
differ only in when each rank's own rows are gathered and on which stream the all-to-all runs. Same bytes land
in the same rows in every variant (checked against main's form on every rank). Per call: device time of 30
calls back to back (events on the caller's stream), median of 3 bursts; the slowest rank's figure.

- main: the first and last rank gather the rows for the peers, start all_to_all_single on NCCL's stream
  (async_op=True), then gather their own rows into the output on the caller's stream; the middle ranks gather
  all their rows (own included), then all_to_all_single.
- main+prio: as main, but the first and last rank's all-to-all runs on a high-priority stream (async_op=False,
  which torch >= 2.8 launches on the current stream), so that the block scheduler starts NCCL's kernel before
  the own-row gather queued beside it (timeline.py showed that gather delaying the kernel's start).
- list: every rank gathers only the rows for the peers and sends them in a list all_to_all (its own block
  empty), then gathers its own rows into the output (the `middle-ranks` branch of the thirteenth session).
- list+prio: list, with the all-to-all on the high-priority stream.
- main+4chunks, main+8chunks: main, with the first and last rank's own-row gather cut into 4 or 8 index_selects,
  so that NCCL's kernel can start between two of them instead of after all.
Also each variant's host time per call (issuing 30 calls back to back, per rank).

    torchrun --standalone --nproc-per-node 4 docs/results/2026-11-22-session14/own_rows_bench.py
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
from deep_ep.routing import gather_rows  # noqa: E402
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
    tokens_sent = route.send_tokens
    own_begin = sum(send_splits[:rank])
    own_end = own_begin + send_splits[rank]
    recv_begin = sum(recv_splits[:rank])
    own_tokens = tokens_sent[own_begin:own_end]
    to_peers = torch.cat([tokens_sent[:own_begin], tokens_sent[own_end:]])
    peer_send = [0 if d == rank else n for d, n in enumerate(send_splits)]
    peer_recv = [0 if s == rank else n for s, n in enumerate(recv_splits)]
    ends = rank in (0, world - 1)
    prio = torch.cuda.Stream(device, priority=-1)  # CUDA: lower numbers are higher priorities; the default is 0

    def own_into(out: torch.Tensor, chunks: int = 1) -> None:
        own = out[recv_begin : recv_begin + send_splits[rank]]
        step = -(-own_tokens.shape[0] // chunks)
        for begin in range(0, own_tokens.shape[0], step):
            gather_rows(rows, own_tokens[begin : begin + step], out=own[begin : begin + step])

    def main_form(high: bool, chunks: int = 1) -> torch.Tensor:
        out = torch.empty_like(expected)
        flat = out.view(torch.uint8)
        if not ends:
            send = torch.empty((tokens_sent.shape[0], rows.shape[1]), dtype=torch.uint8, device=device)
            gather_rows(rows, tokens_sent, out=send)
            dist.all_to_all_single(flat, send, recv_splits, send_splits, async_op=True).wait()
            return out
        send = torch.empty((to_peers.shape[0], rows.shape[1]), dtype=torch.uint8, device=device)
        gather_rows(rows, to_peers, out=send)
        if rank == 0:
            others = flat[send_splits[rank] :]
        else:
            others = flat[: flat.shape[0] - send_splits[rank]]
        r, s = peer_recv, peer_send
        if high:
            current = torch.cuda.current_stream()
            prio.wait_stream(current)
            send.record_stream(prio)
            with torch.cuda.stream(prio):
                dist.all_to_all_single(others, send, r, s)
            own_into(flat)
            current.wait_stream(prio)
        else:
            work = dist.all_to_all_single(others, send, r, s, async_op=True)
            own_into(flat, chunks)
            work.wait()
        return out

    def list_form(high: bool) -> torch.Tensor:
        out = torch.empty_like(expected)
        flat = out.view(torch.uint8)
        send = torch.empty((to_peers.shape[0], rows.shape[1]), dtype=torch.uint8, device=device)
        gather_rows(rows, to_peers, out=send)
        outs = list(flat.split(recv_splits))
        outs[rank] = flat[:0]
        ins = list(send.split(peer_send))
        if high:
            current = torch.cuda.current_stream()
            prio.wait_stream(current)
            send.record_stream(prio)
            with torch.cuda.stream(prio):
                dist.all_to_all(outs, ins)
            own_into(flat)
            current.wait_stream(prio)
        else:
            work = dist.all_to_all(outs, ins, async_op=True)
            own_into(flat)
            work.wait()
        return out

    variants = {
        "main": lambda: main_form(False),
        "main+prio": lambda: main_form(True),
        "main+4chunks": lambda: main_form(False, 4),
        "main+8chunks": lambda: main_form(False, 8),
        "list": lambda: list_form(False),
        "list+prio": lambda: list_form(True),
    }
    for name, call in variants.items():
        got = call()
        torch.cuda.synchronize()
        same = torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
        flags = torch.tensor([int(same)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        if rank == 0 and not flags.item():
            print(f"{name}: MISMATCH on some rank", flush=True)
    results = {name: [] for name in variants}
    host = {name: [] for name in variants}
    for _ in range(BURSTS):
        for name, call in variants.items():  # interleaved, so drift hits every variant alike
            for _ in range(5):
                call()
            dist.all_reduce(torch.ones(1, device=device))
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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
        print(f"{world} ranks; us per cached-dispatch transfer, back to back ({CALLS} calls, median of {BURSTS}):")
        for i, name in enumerate(variants):
            per_rank = " ".join(f"{float(e[i]):7.1f}" for e in everyone)
            issue = " ".join(f"{float(e[len(variants) + i]):6.1f}" for e in everyone)
            print(f"  {name:12s} max {max(float(e[i]) for e in everyone):7.1f}   by rank: {per_rank}  host: {issue}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
