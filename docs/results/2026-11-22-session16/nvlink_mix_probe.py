"""How many cross-GPU bytes per GPU NVLink carries when every GPU pulls from all its peers at once, by SM copies,
by copy engines, and by both together: the question behind issue 8's 4xH200 target (450 GB/s in DeepEP's metric
needs about 338 GB/s of cross bytes per GPU; the SM pull kernel read ~334 at any SM count, copy engines 180-219,
NCCL ~300 in the fourteenth session). If SMs and copy engines together move more than either alone, the cap is
not the links.

Each rank holds, in torch symmetric memory, one block of BLOCK_MB for each peer (rows of 14336 bytes, as 4096 x
7168 bf16 rows). A round moves every block to its destination, pulled: each rank reads its peers' blocks for it
into local memory, a fraction `sm` of each block's rows by the row-gather Triton kernel (the reference backend's,
`deep_ep/kernels/triton_row_gather.py`, identity index) on P programs per peer, the rest by `copy_`
(cudaMemcpyAsync: copy engines), each peer's part on its own stream. Rounds are separated by an NCCL all-reduce;
a round's time is the slowest rank's. Figures: cross bytes per GPU / time, medians of 20 rounds after 5 warm-up
rounds. Every variant's landing area is checked against the peers' bytes once.

    torchrun --standalone --nproc-per-node 4 docs/results/2026-11-22-session16/nvlink_mix_probe.py
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.getcwd())
from deep_ep.backends.peer_memory import SymmetricWorkspace  # noqa: E402
from deep_ep.kernels import triton_row_gather  # noqa: E402

BLOCK_MB = float(os.environ.get("BLOCK_MB", "53"))
ROW_BYTES = 14336
ROUNDS, WARMUP = 20, 5


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    rows = int(BLOCK_MB * (1 << 20)) // ROW_BYTES
    block = rows * ROW_BYTES
    ws = SymmetricWorkspace(dist.group.WORLD, device)
    ws.ensure(world * block)  # send blocks by destination
    ws.local[: world * block].random_(0, 255)
    peers = [p for p in range(world) if p != rank]
    landing = torch.zeros(world * block, dtype=torch.uint8, device=device)
    identity = torch.arange(rows, dtype=torch.int32, device=device)
    streams = [torch.cuda.Stream(device) for _ in range(2 * len(peers))]
    main_stream = torch.cuda.current_stream(device)
    torch.cuda.synchronize()
    ws.barrier(30.0)

    def words(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int32).view(-1, ROW_BYTES // 4)

    def source(p: int) -> torch.Tensor:  # peer p's block for this rank
        return ws.peer(p)[rank * block : (rank + 1) * block]

    def target(p: int) -> torch.Tensor:
        return landing[p * block : (p + 1) * block]

    def pull(sm: float, programs: int):
        split = int(rows * sm)

        def run() -> None:
            for s in streams:
                s.wait_stream(main_stream)
            for i, p in enumerate(peers):
                src, dst = words(source(p)), words(target(p))
                if split:
                    with torch.cuda.stream(streams[2 * i]):
                        triton_row_gather.gather_rows(src, identity[:split], dst[:split], programs)
                if split < rows:
                    with torch.cuda.stream(streams[2 * i + 1]):
                        dst[split:].copy_(src[split:])
            for s in streams:
                main_stream.wait_stream(s)

        return run

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
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            if i >= WARMUP:
                times.append(ms.item())
        return statistics.median(times)

    cases = [("copy engines only", pull(0.0, 0))]
    for programs in (8, 16, 32, 64):
        cases.append((f"SMs only, {programs} programs/peer", pull(1.0, programs)))
    for sm in (0.5, 0.65, 0.8):
        for programs in (8, 16):
            cases.append((f"{sm:.2f} on SMs ({programs} programs/peer) + rest on copy engines", pull(sm, programs)))
    cases.append(
        (
            "NCCL all_to_all_single (own block included)",
            lambda: dist.all_to_all_single(landing, ws.local[: world * block], [block] * world, [block] * world),
        )
    )
    cross = block * len(peers)
    lines = []
    for name, run in cases:
        landing.zero_()
        run()
        torch.cuda.synchronize()
        same = all(torch.equal(target(p), source(p)) for p in peers)
        ok = torch.tensor([int(same)], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        ms = timed(run)
        check = "" if ok.item() else "  MISMATCH"
        lines.append(f"  {name:62s} {ms * 1e3:8.1f} us  {cross / ms / 1e6:7.1f} GB/s cross per GPU{check}")
    if rank == 0:
        print(
            f"{world} ranks, {block / 1e6:.1f} MB per peer block ({cross / 1e6:.1f} MB crossing per GPU), "
            f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
        )
        print("\n".join(lines))
    ws.barrier(30.0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
