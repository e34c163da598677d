"""How fast the GPUs' copy engines move rows between the GPUs of one host, against NCCL's all_to_all_single of the
same bytes: the question behind issue 8's 4xH200 target, whose 450 GB/s (DeepEP's metric) needs about 338 GB/s
of cross-GPU bytes per GPU while the SM kernels (ours, NCCL's) reach 300-335 here.

Each rank holds, in torch symmetric memory, one block of BLOCK_MB for each peer; a round moves every block to
its peer, either pulled (each rank copies its peers' blocks for it into local memory) or pushed (each rank copies
its blocks into its peers' memory), as plain `copy_` of contiguous bytes (cudaMemcpyAsync: copy engines, no
SMs), spread over S streams with each block cut into S / (R - 1) pieces. Rounds are separated by an NCCL
all-reduce; each round's time is the slowest rank's (events around the copies on one stream that the others
join). Figures: cross-GPU bytes per GPU / time, medians of 20 rounds after 5 warm-up rounds.

    torchrun --standalone --nproc-per-node 4 docs/results/2026-11-22-session14/copy_engine_probe.py
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.getcwd())
from deep_ep.backends.peer_memory import SymmetricWorkspace  # noqa: E402

BLOCK_MB = float(os.environ.get("BLOCK_MB", "53"))
ROUNDS, WARMUP = 20, 5


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    block = int(BLOCK_MB * (1 << 20)) // 16 * 16
    ws = SymmetricWorkspace(dist.group.WORLD, device)
    # [send blocks by destination | receive blocks by source], world blocks each.
    ws.ensure(2 * world * block)
    local = ws.local
    local.random_(0, 255)
    peers = [p for p in range(world) if p != rank]
    landing = torch.empty(world * block, dtype=torch.uint8, device=device)

    def send_region(buf: torch.Tensor, dest: int) -> torch.Tensor:
        return buf[dest * block : (dest + 1) * block]

    def recv_region(buf: torch.Tensor, source: int) -> torch.Tensor:
        return buf[(world + source) * block : (world + source + 1) * block]

    def pieces(dst: torch.Tensor, src: torch.Tensor, parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        step = (block + parts - 1) // parts // 16 * 16 or block
        return [(dst[i : i + step], src[i : i + step]) for i in range(0, block, step)]

    def pull_jobs(parts: int) -> list:
        # Rank r reads peer p's block for r (p's send region r) into its landing area's block p.
        return [j for p in peers for j in pieces(send_region(landing, p), send_region(ws.peer(p), rank), parts)]

    def push_jobs(parts: int) -> list:
        # Rank r writes its block for p into p's receive region r.
        return [j for p in peers for j in pieces(recv_region(ws.peer(p), rank), send_region(local, p), parts)]

    streams = [torch.cuda.Stream(device) for _ in range(12)]
    main_stream = torch.cuda.current_stream(device)
    flag = torch.ones(1, device=device)

    def timed(run) -> float:
        times = []
        for i in range(WARMUP + ROUNDS):
            dist.all_reduce(flag)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            ms = torch.tensor([start.elapsed_time(end)], device=device)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the round ends when the slowest rank's copies do
            if i >= WARMUP:
                times.append(ms.item())
        ws.barrier(10.0)
        torch.cuda.synchronize()
        return statistics.median(times)

    def on_streams(jobs: list, count: int):
        def run() -> None:
            used = streams[:count]
            for s in used:
                s.wait_stream(main_stream)
            for i, (dst, src) in enumerate(jobs):
                with torch.cuda.stream(used[i % count]):
                    dst.copy_(src)
            for s in used:
                main_stream.wait_stream(s)

        return run

    def barrier_then(run):
        def go() -> None:
            ws.barrier(10.0)  # the peers' sources are ready (a device barrier, as a kernel would need)
            run()

        return go

    cases = []
    for kind, jobs_of in (("pull", pull_jobs), ("push", push_jobs)):
        for parts, count in ((1, 1), (1, world - 1), (2, 2 * (world - 1)), (4, 4 * (world - 1))):
            cases.append((f"{kind} {parts} piece(s)/peer on {count} stream(s)", on_streams(jobs_of(parts), count)))
    cases.append(("pull 1 piece/peer on 3 streams after a device barrier", barrier_then(on_streams(pull_jobs(1), 3))))
    send = local[: world * block]
    recv = landing
    splits = [block] * world
    cases.append(
        ("NCCL all_to_all_single (own block included)", lambda: dist.all_to_all_single(recv, send, splits, splits))
    )
    cross = block * (world - 1)
    results = []
    for name, run in cases:
        ms = timed(run)
        results.append(f"  {name:58s} {ms * 1e3:8.1f} us  {cross / ms / 1e6:7.1f} GB/s cross per GPU")
    if rank == 0:
        print(
            f"{world} ranks, {block / 1e6:.1f} MB per peer block ({cross / 1e6:.1f} MB crossing per GPU), "
            f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
        )
        print("\n".join(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
