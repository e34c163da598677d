"""Triton kernel of the cuda backend's normal mode: rows pushed straight into peer workspaces over NVLink.

One kernel serves dispatch, cached dispatch and combine. Every rank's workspace is addressed as int32 words
from this rank's (`ws`); rank d's lies at `ws + peer_delta[d]` (deep_ep/backends/peer_memory.py). A launch
moves one tensor's rows: row i goes, for every rank d with `dest[i, d] >= 0`, to row `dest[i, d]` of the
region that starts at word `region` of rank d's workspace. A dispatch row may go to several ranks (it is
read once and stored to each); a combine row goes home to one. A narrow companion tensor with the same rows
(fp8 scales, a fresh dispatch's packed small fields, combine weights) rides in the same launch into its own
region, each tile's companion rows stored after its main rows: one launch per call instead of two.

The grid is persistent: `num_sms` programs (one per SM, the `Config.num_sms` budget) stride over tiles of
ROWS rows, each loading its next tile before it stores the current one. Rows are taken in `order` where one is
given: a combine's rows come grouped by destination, and taken in that order every rank would write to the same
destination at the same time (all ranks' NVLink traffic into one GPU); the combine's order interleaves the
destinations instead. Workspace rows start 16-byte aligned
(region and pitch are multiples of 4 words, the deltas are checked), so the stores are 16-byte vectors when
the source rows are aligned too.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl


@triton.jit
def _tile_rows(order, positions, num_rows, HAS_ORDER: tl.constexpr):
    """The source rows a tile of processing `positions` covers (`order[position]`, or the position itself)."""
    if HAS_ORDER:
        return tl.load(order + positions, mask=positions < num_rows, other=0).to(tl.int64)
    return positions


@triton.jit
def _load_rows(src, rows, live, src_stride, col, WORDS: tl.constexpr, SRC_ALIGNED: tl.constexpr):
    source = rows * src_stride
    if SRC_ALIGNED:
        source = tl.multiple_of(source, 4)
    mask = live[:, None] & (col < WORDS)[None, :]
    return tl.load(src + source[:, None] + col[None, :], mask=mask)


@triton.jit
def _store_rows(values, rows, live, col, dest, ws, peer_delta, region, pitch, R: tl.constexpr, WORDS: tl.constexpr):
    mask = live[:, None] & (col < WORDS)[None, :]
    for d in tl.static_range(R):
        row = tl.load(dest + rows * R + d, mask=live, other=-1).to(tl.int64)
        target = tl.multiple_of(tl.load(peer_delta + d) + region + row * pitch, 4)
        tl.store(ws + target[:, None] + col[None, :], values, mask=mask & (row >= 0)[:, None])


@triton.jit
def _push_companion(src2, rows, live, stride2, dest, ws, peer_delta, region2, pitch2, R, WORDS2, BLOCK2, SRC2_ALIGNED):
    """The companion tensor's rows of the same tile, to the same destination rows of its own region."""
    cols = tl.arange(0, BLOCK2)
    values = _load_rows(src2, rows, live, stride2, cols, WORDS2, SRC2_ALIGNED)
    _store_rows(values, rows, live, cols, dest, ws, peer_delta, region2, pitch2, R, WORDS2)


@triton.jit
def push_rows_kernel(
    src,  # int32 words: the rows being sent, [num_rows, WORDS] with row stride `src_stride`
    dest,  # int32 [num_rows, R]: the row each source row takes in rank d's region, or -1
    order,  # int32 [num_rows]: the source row at each processing position (read when HAS_ORDER)
    ws,  # int32 words: this rank's workspace
    peer_delta,  # int64 [R]: words from `ws` to rank d's workspace, multiples of 4
    region,  # word offset of the region in every rank's workspace, a multiple of 4
    num_rows,
    src_stride,  # words
    pitch,  # words per workspace row, a multiple of 4
    src2,  # int32 words: a narrow companion tensor with the same rows (read when WORDS2 > 0)
    stride2,  # words
    region2,  # word offset of the companion's region, a multiple of 4
    pitch2,  # words per row of the companion's region, a multiple of 4
    R: tl.constexpr,
    WORDS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    SRC_ALIGNED: tl.constexpr,  # source rows start 16-byte aligned
    HAS_ORDER: tl.constexpr,
    WORDS2: tl.constexpr = 0,  # 0: no companion
    BLOCK2: tl.constexpr = 16,  # a power of two >= WORDS2
    SRC2_ALIGNED: tl.constexpr = False,
):
    step = tl.num_programs(0) * ROWS
    positions = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if WORDS <= BLOCK:
        # Whole rows per tile, and the next tile is loaded before this one is stored: each program keeps two
        # tiles in flight, so its NVLink stores do not wait for one load after another.
        rows = _tile_rows(order, positions, num_rows, HAS_ORDER)
        values = _load_rows(src, rows, positions < num_rows, src_stride, cols, WORDS, SRC_ALIGNED)
        for _ in range(tl.program_id(0) * ROWS, num_rows, step):
            upcoming_rows = _tile_rows(order, positions + step, num_rows, HAS_ORDER)
            upcoming = _load_rows(src, upcoming_rows, positions + step < num_rows, src_stride, cols, WORDS, SRC_ALIGNED)
            live = positions < num_rows
            _store_rows(values, rows, live, cols, dest, ws, peer_delta, region, pitch, R, WORDS)
            if WORDS2 > 0:
                _push_companion(
                    src2, rows, live, stride2, dest, ws, peer_delta, region2, pitch2, R, WORDS2, BLOCK2, SRC2_ALIGNED
                )
            values = upcoming
            rows = upcoming_rows
            positions += step
    else:
        for _ in range(tl.program_id(0) * ROWS, num_rows, step):
            rows = _tile_rows(order, positions, num_rows, HAS_ORDER)
            live = positions < num_rows
            for start in tl.static_range(0, WORDS, BLOCK):
                values = _load_rows(src, rows, live, src_stride, start + cols, WORDS, SRC_ALIGNED)
                _store_rows(values, rows, live, start + cols, dest, ws, peer_delta, region, pitch, R, WORDS)
            if WORDS2 > 0:
                _push_companion(
                    src2, rows, live, stride2, dest, ws, peer_delta, region2, pitch2, R, WORDS2, BLOCK2, SRC2_ALIGNED
                )
            positions += step


COMPANION_MAX_WORDS = 256  # a second tensor this narrow (1 KB rows: scales, packed small fields, weights) rides along


@functools.cache
def tile_shape(words: int) -> tuple[int, int]:
    """(ROWS, BLOCK) of a tile: up to 8192 words of a row per step (whole rows up to 32 KB) and about 8192 words
    in all (32 registers per thread at 8 warps, twice that with the prefetched tile), so wide rows go one or two
    at a time and narrow ones many at once."""
    block = min(8192, triton.next_power_of_2(max(words, 1)))
    return max(1, min(64, 8192 // block)), block
