"""Probe (eighth session): can the cuda backend's cached dispatch and combine *pull* over NVLink instead of push?

Today a cached dispatch pushes every row into its receivers' workspaces, waits at one barrier, then each receiver
copies its rows out of the workspace into `recv_x` (~100 us at 4096 x 7168 bf16 on 4xH200). Pulling inverts it:
each rank copies its x into its own workspace (58 MB, local), one barrier, then each receiver reads its rows
straight out of the peers' workspaces into `recv_x` (remote reads, local writes): no copy-out. For combine the
probe tries the same: each rank copies its rows into its workspace, one barrier, then each source reads and sums
its tokens' rows from every peer in the SPEC order (one kernel on the SM budget).

Run on a host with 4 NVLink GPUs, from the repository root:
    torchrun --nproc-per-node 4 docs/results/2026-11-22-4xh200-session8/pull-probe/pull_probe.py
Prints, per SM budget, the cuda backend's cached dispatch / combine (today's push) and the pull variants, timed
back to back in the same process (bursts of 10 calls, an event pair around each, the first of each burst
dropped, median), and checks every pulled result against the backend's bit for bit.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.distributed as dist
import triton
import triton.language as tl

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../.."))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

import deep_ep  # noqa: E402
from bench import make_routing, make_x  # noqa: E402
from deep_ep.backends.cuda import dispatch_push_plan  # noqa: E402
from deep_ep.backends.peer_memory import SymmetricWorkspace, word_deltas  # noqa: E402


@triton.jit
def _pull_tile(ws, source, order, region, positions, num_rows, cols, WORDS: tl.constexpr):
    live = positions < num_rows
    rows = tl.load(order + positions, mask=live, other=0).to(tl.int64)
    offset = tl.multiple_of(tl.load(source + rows, mask=live, other=0) + region, 4)
    return rows, tl.load(ws + offset[:, None] + cols[None, :], mask=live[:, None] & (cols < WORDS)[None, :])


@triton.jit
def pull_rows_kernel(
    out, source, order, ws, region, num_rows, WORDS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    """out[j] = the row at word `source[j] + region` from `ws` (a peer's workspace via its delta), rows taken in
    `order`, persistent."""
    step = tl.num_programs(0) * ROWS
    positions = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    rows, values = _pull_tile(ws, source, order, region, positions, num_rows, cols, WORDS)
    for _ in range(tl.program_id(0) * ROWS, num_rows, step):
        upcoming_rows, upcoming = _pull_tile(ws, source, order, region, positions + step, num_rows, cols, WORDS)
        live = positions < num_rows
        target = tl.multiple_of(rows * WORDS, 4)
        tl.store(out + target[:, None] + cols[None, :], values, mask=live[:, None] & (cols < WORDS)[None, :])
        values = upcoming
        rows = upcoming_rows
        positions += step


@triton.jit
def pull_sum_kernel(
    out, row_index, ws, deltas, region, pitch, num_tokens, R: tl.constexpr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr
):
    """out[t] = sum over d = 0..R-1 of the row row_index[t, d] of rank d's region (bf16 elements), fp32 adds in
    order from +0.0, one rounding; persistent over tokens."""
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    for token in range(tl.program_id(0), num_tokens, tl.num_programs(0)):
        t = token + tl.zeros([], dtype=tl.int64)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for d in tl.static_range(R):
            row = tl.load(row_index + t * R + d).to(tl.int64)
            present = row >= 0
            base = tl.load(deltas + d) + region + tl.where(present, row, 0) * pitch
            values = tl.load(ws + base + cols, mask=cols < tl.where(present, HIDDEN, 0), other=0.0)
            acc = acc + values.to(tl.float32)
        tl.store(out + t * HIDDEN + cols, acc.to(out.dtype.element_ty), mask=mask)


def time_back_to_back(fn, bursts: int = 6, burst: int = 10) -> float:
    """Median seconds per call: bursts of back-to-back calls, an event pair around each, first of a burst dropped."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(bursts):
        dist.barrier()
        torch.cuda.synchronize()
        events = []
        for _ in range(burst + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        samples += [s.elapsed_time(e) / 1e3 for s, e in events[1:]]
    return statistics.median(samples)


def main() -> None:
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=device)
    group = dist.group.WORLD
    tokens, hidden, experts, topk = 4096, 7168, 256, 8

    topk_idx, topk_weights = make_routing(rank, tokens, experts, topk)
    topk_idx, topk_weights = topk_idx.to(device), topk_weights.to(device)
    x = make_x(rank, tokens, hidden).to(device)
    buffer = deep_ep.Buffer(group, backend="cuda")
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=topk_idx, topk_weights=topk_weights,
    )

    # The pull plan: per received row, the word offset (peer delta + source row * pitch) of its source row.
    counts_row = in_rank.sum(0).tolist()
    all_rows = [None] * world
    dist.all_gather_object(all_rows, counts_row, group=group)
    dest = dispatch_push_plan(all_rows, rank, in_rank).dest
    dests = [torch.empty_like(dest) for _ in range(world)]
    dist.all_gather(dests, dest, group=group)
    words = hidden * 2 // 4
    pitch = words  # 14336 bytes: a multiple of 16
    capacity = max(sum(all_rows[s][d] for s in range(world)) for d in range(world))
    workspace = SymmetricWorkspace(group, device)
    half_words = max(tokens, capacity) * pitch
    workspace.ensure(2 * half_words * 4)
    ws = workspace.local.view(torch.int32)
    deltas = word_deltas(workspace, device)
    received = recv_x.shape[0]
    source = torch.empty(received, dtype=torch.int64, device=device)
    for s in range(world):
        token = (dests[s][:, rank] >= 0).nonzero().squeeze(1)
        source[dests[s][token, rank].long()] = deltas[s] + token * pitch
    calls = [0]
    # Orders of the received rows: ascending (every rank reads source 0 first, then 1, ...), or round-robin over
    # the source blocks (every rank reads from all peers at once), as the combine push interleaves.
    recv_counts = torch.tensor([all_rows[s][rank] for s in range(world)], device=device)
    peer = torch.repeat_interleave(torch.arange(world, device=device), recv_counts, output_size=received)
    entry = torch.arange(received, device=device)
    block_start = torch.cumsum(recv_counts, 0) - recv_counts
    orders = {"ascending": entry.int(), "interleaved": torch.argsort((entry - block_start[peer]) * world + peer).int()}

    def pull_dispatch(num_sms: int, rows: int, warps: int, order: str = "interleaved") -> torch.Tensor:
        region = (calls[0] % 2) * half_words
        calls[0] += 1
        ws[region : region + tokens * pitch].view(tokens, pitch).copy_(x.view(torch.int32))
        workspace.barrier(30)
        out = torch.empty(received, hidden, dtype=x.dtype, device=device)
        block = triton.next_power_of_2(words)
        pull_rows_kernel[(num_sms,)](out.view(torch.int32), source, orders[order], ws, region, received, WORDS=words,
                                     ROWS=rows, BLOCK=block, num_warps=warps)
        return out

    # Combine: expert outputs = the received rows; source t's row from d sits at dest[t, d] of d's region.
    combine_x = recv_x
    row_index = dest.contiguous()

    def pull_combine(num_sms: int, warps: int) -> torch.Tensor:
        region = (calls[0] % 2) * half_words
        calls[0] += 1
        ws[region : region + received * pitch].view(received, pitch).copy_(combine_x.view(torch.int32))
        workspace.barrier(30)
        out = torch.empty(tokens, hidden, dtype=x.dtype, device=device)
        pull_sum_kernel[(num_sms,)](out, row_index, ws.view(torch.bfloat16), deltas * 2, region * 2, pitch * 2,
                                    tokens, R=world, HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden),
                                    num_warps=warps)
        return out

    lines = []
    for num_sms in (20, 32, 64):
        deep_ep.Buffer.set_num_sms(num_sms)
        expected = buffer.dispatch(x, handle=handle)[0]
        combined = buffer.combine(combine_x, handle)[0]
        push_d = time_back_to_back(lambda: buffer.dispatch(x, handle=handle))
        push_c = time_back_to_back(lambda: buffer.combine(combine_x, handle))
        lines.append(f"sms={num_sms} push: cached dispatch {push_d * 1e3:.3f} ms, combine {push_c * 1e3:.3f} ms")
        for rows, warps, order in ((2, 8, "ascending"), (2, 8, "interleaved"), (4, 16, "interleaved"),
                                   (1, 4, "interleaved"), (1, 8, "interleaved")):
            same = torch.equal(pull_dispatch(num_sms, rows, warps, order), expected)
            t = time_back_to_back(lambda: pull_dispatch(num_sms, rows, warps, order))
            lines.append(
                f"sms={num_sms} pull dispatch {order} rows={rows} warps={warps}: {t * 1e3:.3f} ms, equal={same}"
            )
        for warps in (8, 16):
            same = torch.equal(pull_combine(num_sms, warps), combined)
            t = time_back_to_back(lambda: pull_combine(num_sms, warps))
            lines.append(f"sms={num_sms} pull combine warps={warps}: {t * 1e3:.3f} ms, equal={same}")
    # the parts of the pull dispatch alone (copy-in, barrier) at 32 SMs
    region = 0
    t_copy = time_back_to_back(lambda: ws[region : region + tokens * pitch].view(tokens, pitch).copy_(x.view(torch.int32)))
    t_barrier = time_back_to_back(lambda: workspace.barrier(30))
    lines.append(f"copy-in of x alone {t_copy * 1e3:.3f} ms, barrier alone {t_barrier * 1e3:.3f} ms")
    gathered = [None] * world
    dist.all_gather_object(gathered, lines, group=group)
    if rank == 0:
        for r, rank_lines in enumerate(gathered):
            print(f"--- rank {r}")
            print("\n".join(rank_lines))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
