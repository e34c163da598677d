"""What a rank's own block costs inside NCCL's all-to-all, and whether a list all-to-all moves the other blocks as
fast as all_to_all_single: device time per call back to back (CUDA events around bursts of 20, median of 7
bursts) and host time per call, for R ranks each sending 4096 / R * 3.6 rows of 14336 bytes (about the reference's
cached dispatch at 4096 tokens, top-8 of 256) to every rank:
  single+own   all_to_all_single, own block included (NCCL copies it locally);
  single-own   all_to_all_single with the own block's split 0 (possible on the first and last rank only: here
               every rank's own block is cut from a buffer laid out for it, so the timing is representative);
  list-own     list all_to_all, own block empty (any rank).

    torchrun --standalone --nproc-per-node R docs/results/2026-11-22-session13/own_block_bench.py
"""

import os
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    block, width = int(4096 * 3.6 / world), 14336
    send = torch.randint(0, 255, (world * block, width), dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    full = [block] * world
    cut = [0 if r == rank else block for r in range(world)]
    others_send = send[: (world - 1) * block]  # the other blocks, as one stretch
    others_recv = recv[: (world - 1) * block]
    ins = [send[r * block : (r + 1) * block] if r != rank else send[:0] for r in range(world)]
    outs = [recv[r * block : (r + 1) * block] if r != rank else recv[:0] for r in range(world)]
    forms = {
        "single+own": lambda: dist.all_to_all_single(recv, send, full, full),
        "single-own": lambda: dist.all_to_all_single(others_recv, others_send, cut, cut),
        "list-own": lambda: dist.all_to_all(outs, ins),
    }
    device_us = {name: [] for name in forms}
    host_us = {name: [] for name in forms}
    for _ in range(3):
        for call in forms.values():
            call()
    for _ in range(7):
        for name, call in forms.items():
            dist.barrier()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            for _ in range(20):
                call()
            end.record()
            host_us[name].append((time.perf_counter() - t0) * 1e6 / 20)
            end.synchronize()
            device_us[name].append(start.elapsed_time(end) * 1e3 / 20)
    medians = {n: (statistics.median(device_us[n]), statistics.median(host_us[n])) for n in forms}
    every = [None] * world
    dist.all_gather_object(every, medians)
    if rank == 0:
        print(f"{world} ranks, {block} rows of {width} bytes per block; per call, device us / host us, by rank")
        for name in forms:
            cells = "  ".join(f"{m[name][0]:6.1f} / {m[name][1]:5.1f}" for m in every)
            print(f"  {name:11s} {cells}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
