"""Probe: can TMA (Hopper's tensor-memory accelerator, through Triton's tensor descriptors) move rows between
GPUs over NVLink faster than the cuda backend's register pull kernel (~325 GB/s of cross bytes per GPU on 2xH200,
~334 on 4xH200: the ceiling issue 8's 4xH200 target runs into)?

Every rank holds 4096 rows of 14336 bytes (4096 x 7168 bf16, as int32 words) in symmetric memory and, all ranks at
once, moves its peer's block into local memory (pull) or its own block into the peer's (push), by:
- `library pull`: deep_ep's pull_rows_kernel (identity rows), the cuda backend's cached dispatch;
- `tma pull` / `tma push`: a persistent kernel, each program loading [TR, 256]-word tiles through a descriptor of
  the source and storing them through a descriptor of the destination;
- `copy engine`: `copy_` from the peer's tensor.
Cross GB/s = bytes moved per GPU / median time (events; 10 timed runs after 3 warm-ups, a barrier before each);
the bytes landed are checked after each variant. Two ranks: each GPU's NVLink carries one direction of each pair.

    torchrun --standalone --nproc-per-node 2 docs/results/2026-11-23-session24/tma_probe.py
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.getcwd())
from deep_ep.kernels.triton_normal import pull_rows_kernel, tile_shape  # noqa: E402

ROWS, WORDS = 4096, 3584
TC = 256  # a TMA box is at most 256 elements per dimension


@triton.jit
def tma_copy_kernel(src_desc, dst_desc, num_tiles, COL_TILES: tl.constexpr, TR: tl.constexpr, STAGES: tl.constexpr):
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), num_stages=STAGES):
        r = (tile // COL_TILES) * TR
        c = (tile % COL_TILES) * 256
        tile_values = src_desc.load([r, c])
        dst_desc.store([r, c], tile_values)


def timed(fn, device) -> float:
    samples = []
    for i in range(13):
        dist.barrier()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        if i >= 3:
            samples.append(start.elapsed_time(end))
    slowest = torch.tensor([statistics.median(samples)], device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # the slowest rank's median
    return slowest.item()


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    dist.init_process_group("nccl", device_id=device)
    import torch.distributed._symmetric_memory as symm_mem

    numel = ROWS * WORDS
    local = symm_mem.empty(2 * numel, dtype=torch.int32, device=device)  # [0, numel): rows; then a push target
    handle = symm_mem.rendezvous(local, dist.group.WORLD.group_name)
    peer = (rank + 1) % world
    peer_buf = handle.get_buffer(peer, (2 * numel,), torch.int32, 0)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    local[:numel].copy_(torch.randint(-(2**31), 2**31 - 1, (numel,), generator=gen, device=device, dtype=torch.int32))
    expect_peer = torch.randint(
        -(2**31),
        2**31 - 1,
        (numel,),
        generator=torch.Generator(device=device).manual_seed(1000 + peer),
        device=device,
        dtype=torch.int32,
    ).view(ROWS, WORDS)
    expect_own = local[:numel].view(ROWS, WORDS).clone()
    out = torch.empty(ROWS, WORDS, dtype=torch.int32, device=device)
    src_rows = local[:numel].view(ROWS, WORDS)
    peer_rows = peer_buf[:numel].view(ROWS, WORDS)
    peer_target = peer_buf[numel:].view(ROWS, WORDS)
    own_target = local[numel:].view(ROWS, WORDS)
    dist.barrier()
    torch.cuda.synchronize(device)
    nbytes = numel * 4
    results = []

    def report(name: str, ms: float, ok: bool) -> None:
        gbps = nbytes / ms / 1e6
        results.append((name, ms, gbps, ok))
        if rank == 0:
            print(f"{name:44s} {ms * 1000:8.1f} us {gbps:7.1f} GB/s  bytes {'ok' if ok else 'WRONG'}", flush=True)

    # library pull (identity rows from the peer's workspace)
    ws = local
    delta = (peer_buf.data_ptr() - local.data_ptr()) // 4
    identity = torch.arange(ROWS, dtype=torch.int32, device=device)
    sources = torch.full((ROWS,), delta, dtype=torch.int64, device=device)
    tr, block, warps = tile_shape(WORDS)
    dummy = torch.empty(1, 4, dtype=torch.int32, device=device)
    for programs in (20, 32, 64):

        def library_pull(p=programs):
            pull_rows_kernel[(p,)](
                out,
                identity,
                sources,
                identity,
                ws,
                0,
                ROWS,
                WORDS,
                WORDS,
                dummy,
                4,
                0,
                4,
                WORDS=WORDS,
                ROWS=tr,
                BLOCK=block,
                OUT_ALIGNED=True,
                num_warps=warps,
            )

        out.zero_()
        ms = timed(library_pull, device)
        report(f"library pull, {programs} programs", ms, torch.equal(out, expect_peer))

    for tr_ in (16, 32):
        for stages in (4,):
            if tr_ * 256 * 4 * stages > 200 * 1024:
                continue
            col_tiles = WORDS // TC
            num_tiles = (ROWS // tr_) * col_tiles
            src_desc = TensorDescriptor.from_tensor(peer_rows, [tr_, TC])
            out_desc = TensorDescriptor.from_tensor(out, [tr_, TC])
            own_desc = TensorDescriptor.from_tensor(src_rows, [tr_, TC])
            push_desc = TensorDescriptor.from_tensor(peer_target, [tr_, TC])
            for programs in (32,):
                for warps in (4,):

                    def tma_pull(p=programs, w=warps):
                        tma_copy_kernel[(p,)](
                            src_desc, out_desc, num_tiles, COL_TILES=col_tiles, TR=tr_, STAGES=stages, num_warps=w
                        )

                    def tma_push(p=programs, w=warps):
                        tma_copy_kernel[(p,)](
                            own_desc, push_desc, num_tiles, COL_TILES=col_tiles, TR=tr_, STAGES=stages, num_warps=w
                        )

                    try:
                        out.zero_()
                        ms = timed(tma_pull, device)
                        report(
                            f"tma pull, {tr_}x256 tiles, {stages} stages, {programs} programs",
                            ms,
                            torch.equal(out, expect_peer),
                        )
                        own_target.zero_()
                        dist.barrier()
                        ms = timed(tma_push, device)
                        dist.barrier()
                        torch.cuda.synchronize(device)
                        # what the peer pushed into this rank's second half is the peer's rows
                        report(
                            f"tma push, {tr_}x256 tiles, {stages} stages, {programs} programs",
                            ms,
                            torch.equal(own_target, expect_peer),
                        )
                    except Exception as error:  # a configuration Triton refuses: say so and go on
                        if rank == 0:
                            print(
                                f"tma {tr_}x256, {stages} stages, {programs}: {type(error).__name__}: {str(error)[:200]}"
                            )

    # the combine's push kernel: every row to the peer's second half, same row index
    from deep_ep.kernels.triton_normal import push_rows_kernel

    dest = torch.full((ROWS, world), -1, dtype=torch.int32, device=device)
    dest[:, peer] = identity
    deltas = torch.zeros(world, dtype=torch.int64, device=device)
    deltas[peer] = delta
    for programs in (20, 32, 64):

        def library_push(p=programs):
            push_rows_kernel[(p,)](
                src_rows,
                dest,
                identity,
                ws,
                deltas,
                numel,
                ROWS,
                WORDS,
                WORDS,
                dummy,
                4,
                0,
                4,
                R=world,
                WORDS=WORDS,
                ROWS=tr,
                BLOCK=block,
                SRC_ALIGNED=True,
                HAS_ORDER=False,
                num_warps=warps,
            )

        own_target.zero_()
        dist.barrier()
        ms = timed(library_push, device)
        torch.cuda.synchronize(device)
        dist.barrier()
        report(f"library push, {programs} programs", ms, torch.equal(own_target, expect_peer))

    for rep in range(3):
        out.zero_()
        ms = timed(lambda: out.copy_(peer_rows), device)
        report(f"copy engine pull (copy_), run {rep}", ms, torch.equal(out, expect_peer))
        own_target.zero_()
        dist.barrier()
        ms = timed(lambda: peer_target.copy_(src_rows), device)
        torch.cuda.synchronize(device)
        dist.barrier()
        report(f"copy engine push (copy_ into the peer), run {rep}", ms, torch.equal(own_target, expect_peer))
    side = torch.cuda.Stream(device)
    main_stream = torch.cuda.current_stream(device)

    def side_push():
        side.wait_stream(main_stream)
        with torch.cuda.stream(side):
            peer_target.copy_(src_rows)
        main_stream.wait_stream(side)

    own_target.zero_()
    dist.barrier()
    ms = timed(side_push, device)
    torch.cuda.synchronize(device)
    dist.barrier()
    report("copy engine push on a side stream", ms, torch.equal(own_target, expect_peer))
    for chunks in (2, 4):
        streams = [torch.cuda.Stream(device) for _ in range(chunks)]

        def chunked_push(n=chunks, streams=streams):
            step = ROWS // n
            for i, st in enumerate(streams):
                st.wait_stream(main_stream)
                with torch.cuda.stream(st):
                    peer_target[i * step : (i + 1) * step].copy_(src_rows[i * step : (i + 1) * step])
            for st in streams:
                main_stream.wait_stream(st)

        own_target.zero_()
        dist.barrier()
        ms = timed(chunked_push, device)
        torch.cuda.synchronize(device)
        dist.barrier()
        report(f"copy engine push in {chunks} chunks on {chunks} streams", ms, torch.equal(own_target, expect_peer))
    both = torch.empty(2 * numel, dtype=torch.int32, device=device)
    send = torch.cat([src_rows.reshape(-1), src_rows.reshape(-1)])
    ms = timed(lambda: dist.all_to_all_single(both, send), device)
    report(
        "NCCL all_to_all_single (own block too)",
        ms,
        torch.equal(both[peer * numel : (peer + 1) * numel].view(ROWS, WORDS), expect_peer),
    )
    assert torch.equal(src_rows, expect_own)
    if rank == 0:
        best = max(results, key=lambda r: r[2] if r[3] else 0)
        print(f"best: {best[0]}: {best[2]:.1f} GB/s")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
