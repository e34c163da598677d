"""CPU time (all of the process's threads, gloo's included) against wall time per call, per rank, for the raw
all-to-alls of the bench and deep_ep's reference cached dispatch and combine (512 tokens x 7168 bf16, top-8 of
256, gloo). Medians of 20 calls, each after a barrier, the four ops alternating call by call.

    TREE=/path/to/a/tree OMP_NUM_THREADS=1 python docs/results/2026-11-22-session17/cpu_budget.py 4

TREE: the directory whose deep_ep and tools run (default: the current directory); the ranks are spawned with
this process's sys.path, so they import it too.
"""

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.environ.get("TREE", os.getcwd()))
import deep_ep  # noqa: E402
from tools.bench import make_routing, make_x  # noqa: E402

N, H, E, K = 512, 7168, 256, 8


def run(rank: int, R: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29546")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=R)
    buf = deep_ep.Buffer(dist.group.WORLD)
    idx, w = make_routing(rank, N, E, K, seed=0)
    x = make_x(rank, N, H)
    lay = buf.get_dispatch_layout(idx, E)
    recv_x, _, _, _, handle, _ = buf.dispatch(
        x,
        num_tokens_per_rank=lay[0],
        num_tokens_per_rdma_rank=lay[1],
        is_token_in_rank=lay[3],
        num_tokens_per_expert=lay[2],
        topk_idx=idx,
        topk_weights=w,
    )
    # raw baselines: uint8 rows of the same bytes and splits as bench.py's
    send = lay[0].tolist()
    recv = [0] * R
    counts = torch.tensor(send)
    table = [torch.zeros(R, dtype=torch.long) for _ in range(R)]
    dist.all_gather(table, counts)
    recv = [int(t[rank]) for t in table]
    row = 2 * H
    d_in = torch.empty(sum(send) * row, dtype=torch.uint8)
    d_out = torch.empty(sum(recv) * row, dtype=torch.uint8)

    def raw_dispatch():
        dist.all_to_all_single(d_out, d_in, [n * row for n in recv], [n * row for n in send])

    def raw_combine():
        dist.all_to_all_single(d_in, d_out, [n * row for n in send], [n * row for n in recv])

    ops = {
        "raw dispatch": raw_dispatch,
        "cached dispatch": lambda: buf.dispatch(x, handle=handle),
        "raw combine": raw_combine,
        "combine": lambda: buf.combine(recv_x, handle),
    }
    times = {k: ([], []) for k in ops}
    for i in range(25):
        for name, op in ops.items():
            dist.barrier()
            c, t = time.process_time(), time.perf_counter()
            op()
            if i >= 5:
                times[name][0].append(time.perf_counter() - t)
                times[name][1].append(time.process_time() - c)
    out = {k: (statistics.median(a) * 1e3, statistics.median(b) * 1e3) for k, (a, b) in times.items()}
    res = [None] * R
    dist.all_gather_object(res, out)
    if rank == 0:
        print(f"{R} ranks, {N} tokens x {H} bf16; per rank wall / CPU ms (median of 20)")
        for k in ops:
            cells = "  ".join(f"{r[k][0]:6.2f} / {r[k][1]:6.2f}" for r in res)
            mean_cpu = statistics.mean(r[k][1] for r in res)
            print(f"{k:16s} {cells}   mean CPU {mean_cpu:6.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    R = int(sys.argv[1])
    mp.spawn(run, args=(R,), nprocs=R)
