"""Row gather on one GPU: torch index_select on 8-byte words (what deep_ep's gather_rows does on CUDA) against the
same on 16-byte words (complex128, a pure copy) and a Triton row-copy kernel. Sizes of the reference backend's
cached-dispatch send gather at 4096 tokens x 7168 bf16, top-8 of 256 experts (tools/bench.py's routing):
rank 0 of 4 (its peers' rows), a middle rank (every row), rank 0 of 2. Device time from CUDA events, median of
50 after 10 warm-up.

    python docs/results/2026-11-22-session13/gather_bench.py
"""

import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
from tools.bench import make_routing  # noqa: E402


@triton.jit
def copy_rows_kernel(src, index, dst, WORDS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    source = tl.load(index + row).to(tl.int64)
    for start in tl.static_range(0, WORDS, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < WORDS
        tl.store(dst + row * WORDS + cols, tl.load(src + source * WORDS + cols, mask=mask), mask=mask)


def timed(fn, iters=50):
    for _ in range(10):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main():
    tokens, hidden, experts = 4096, 7168, 256
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    for ranks, who in ((4, "rank 0 (peers only)"), (4, "middle rank (all rows)"), (2, "rank 0 (peers only)")):
        topk_idx, _ = make_routing(0, tokens, experts, 8, seed=0, drop=0.0)
        dest = (topk_idx.cuda() // (experts // ranks))
        in_rank = torch.zeros(tokens, ranks, dtype=torch.bool, device="cuda")
        in_rank.scatter_(1, dest, True)
        lists = [in_rank[:, d].nonzero()[:, 0] for d in range(ranks)]
        index = torch.cat(lists if "middle" in who else lists[1:]).contiguous()
        rows = index.numel()
        words8 = x.view(torch.int64)
        words16 = x.view(torch.complex128)
        out8 = torch.empty(rows, words8.shape[1], dtype=torch.int64, device="cuda")
        out16 = out8.view(torch.complex128)
        moved = 2 * rows * hidden * 2
        res = {
            "index_select int64": timed(lambda: torch.index_select(words8, 0, index, out=out8)),
            "index_select complex128": timed(lambda: torch.index_select(words16, 0, index, out=out16)),
        }
        for block in (512, 1024, 2048):
            res[f"triton int64 BLOCK={block}"] = timed(
                lambda block=block: copy_rows_kernel[(rows,)](words8, index, out8, WORDS=words8.shape[1], BLOCK=block)
            )
        want = words8[index]
        torch.index_select(words16, 0, index, out=out16)
        assert torch.equal(out8, want)
        copy_rows_kernel[(rows,)](words8, index, out8, WORDS=words8.shape[1], BLOCK=1024)
        assert torch.equal(out8, want)
        print(f"{ranks} ranks, {who}: {rows} rows, {moved / 1e6:.0f} MB read+written")
        for name, us in res.items():
            print(f"  {name:28s} {us:7.1f} us  {moved / us / 1e6:6.2f} TB/s")


main()
