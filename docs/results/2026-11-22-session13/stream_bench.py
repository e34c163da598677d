"""Device time per round of [zero-row fill, all_to_all_single, a read of the result] issued back to back, the
collective either async_op=True + work.wait() (torch's side stream, joined back) or async_op=False (torch >= 2.8:
launched on the current stream). Rows of 7168 bf16 (14336 bytes), 4096 rows to every rank (the reference's combine
at 4096 tokens moves about as much), 40 rounds per burst after 10 warm-up, 7 bursts alternating the two forms;
rank 0 prints each burst's mean device time per round (CUDA events around the burst, divided by the rounds).

    torchrun --standalone --nproc-per-node 2 docs/results/2026-11-22-session13/stream_bench.py
"""

import os
import statistics

import torch
import torch.distributed as dist


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    rows, width = 4096 * world, 7168
    send = torch.randn(rows, width, device=device).bfloat16()
    recv = torch.empty(rows + 1, width, device=device, dtype=torch.bfloat16)
    acc = torch.empty(4096, width, device=device, dtype=torch.bfloat16)

    def one_round(async_op: bool) -> None:
        recv[rows:].zero_()
        work = dist.all_to_all_single(recv[:rows], send, async_op=async_op)
        if async_op:
            work.wait()
        torch.add(recv[:4096], recv[4096 : 2 * 4096], out=acc)

    results = {True: [], False: []}
    for _ in range(10):
        one_round(True)
        one_round(False)
    for _ in range(7):
        for form in (True, False):
            dist.barrier()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(40):
                one_round(form)
            end.record()
            end.synchronize()
            results[form].append(start.elapsed_time(end) * 1e3 / 40)
    if rank == 0:
        for form, label in ((True, "async_op=True + wait"), (False, "async_op=False      ")):
            each = " ".join(f"{t:.1f}" for t in results[form])
            print(f"{world} ranks, {label}: median {statistics.median(results[form]):.1f} us per round ({each})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
