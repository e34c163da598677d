"""Hardware check that the low-latency device barrier does not hang when a peer never arrives (2 GPUs):

    DEEP_EP_COMM_TIMEOUT=5 torchrun --nproc-per-node 2 dead_peer_check.py

Both ranks run one dispatch + combine (the workspace is set up collectively); then rank 0 dispatches again and
rank 1 does not. Rank 0's receive kernel must trap after the 5 s timeout, so its synchronize raises a CUDA error
instead of waiting forever; it prints what it saw and how long it took.
"""

import os
import time

import torch
import torch.distributed as dist

import deep_ep

dist.init_process_group("nccl")
rank = dist.get_rank()
torch.cuda.set_device(rank)
buffer = deep_ep.Buffer(dist.group.WORLD, backend="cuda", low_latency_mode=True)
x = torch.randn(8, 512, dtype=torch.bfloat16, device="cuda")
topk_idx = torch.randint(0, 8, (8, 2), device="cuda")
topk_idx[:, 1] = (topk_idx[:, 0] + 1) % 8
weights = torch.rand(8, 2, device="cuda")
recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, 8, 8, use_fp8=False)
buffer.low_latency_combine(recv_x, topk_idx, weights, handle)
torch.cuda.synchronize()
dist.barrier()
print(f"rank {rank}: warm-up round done (timeout {os.environ.get('DEEP_EP_COMM_TIMEOUT')} s)", flush=True)
if rank == 0:
    buffer.check_agreement = False  # else the host-side agreement check would time out first, not the kernel
    start = time.time()
    try:
        buffer.low_latency_dispatch(x, topk_idx, 8, 8, use_fp8=False)
        torch.cuda.synchronize()
        print(f"rank 0: FAIL, the dispatch finished without its peer after {time.time() - start:.1f} s", flush=True)
    except Exception as error:  # the trap surfaces as a CUDA error
        seconds = time.time() - start
        print(f"rank 0: PASS, raised after {seconds:.1f} s: {type(error).__name__}: {error}"[:300], flush=True)
    os._exit(0)  # the CUDA context is gone; skip the process group's teardown
else:
    time.sleep(30)
    os._exit(0)
