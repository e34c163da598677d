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

A cached dispatch *pulls* instead (`pull_rows_kernel`): every rank has copied its token rows into its own
workspace, and after one barrier each receiver reads its rows straight out of the sources' workspaces into its
output, so nothing is copied out afterwards. The rows are taken round-robin over the sources, so every rank reads
from every peer at once.
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


@triton.jit
def _pull_tile(out_row, source, src_row, positions, num_rows):
    """A tile of processing `positions`: the output rows it fills, which of them are live, and where each one's
    source row is (its source rank's workspace as words from `ws`, and its row in that rank's region). Every
    index is stored in processing order: one load each, none waiting for another."""
    live = positions < num_rows
    rows = tl.load(out_row + positions, mask=live, other=0).to(tl.int64)
    base = tl.load(source + positions, mask=live, other=0)
    return rows, live, base, tl.load(src_row + positions, mask=live, other=0).to(tl.int64)


@triton.jit
def _pull_load(ws, base, row, live, region, pitch, col, WORDS: tl.constexpr):
    at = tl.multiple_of(base + region + row * pitch, 4)
    return tl.load(ws + at[:, None] + col[None, :], mask=live[:, None] & (col < WORDS)[None, :])


@triton.jit
def _pull_store(out, values, rows, live, out_stride, col, WORDS: tl.constexpr, OUT_ALIGNED: tl.constexpr):
    at = rows * out_stride
    if OUT_ALIGNED:
        at = tl.multiple_of(at, 4)
    tl.store(out + at[:, None] + col[None, :], values, mask=live[:, None] & (col < WORDS)[None, :])


@triton.jit
def pull_rows_kernel(
    out,  # int32 words: the output rows, [num_rows, WORDS] with row stride `out_stride`
    out_row,  # int32 [num_rows]: the output row at each processing position
    source,  # int64 [num_rows]: per position, words from `ws` to the workspace of the rank holding the source row
    src_row,  # int32 [num_rows]: per position, the source row's index in that rank's region
    ws,  # int32 words: this rank's workspace
    region,  # word offset of the region in every rank's workspace, a multiple of 4
    num_rows,
    out_stride,  # words
    pitch,  # words per workspace row, a multiple of 4
    out2,  # int32 words: a narrow companion output with the same rows (written when WORDS2 > 0)
    stride2,  # words
    region2,  # word offset of the companion's region, a multiple of 4
    pitch2,  # words per row of the companion's region, a multiple of 4
    WORDS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    OUT_ALIGNED: tl.constexpr,  # output rows start 16-byte aligned
    WORDS2: tl.constexpr = 0,  # 0: no companion
    BLOCK2: tl.constexpr = 16,  # a power of two >= WORDS2
    OUT2_ALIGNED: tl.constexpr = False,
):
    step = tl.num_programs(0) * ROWS
    positions = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cols2 = tl.arange(0, BLOCK2)
    if WORDS <= BLOCK:
        # Remote reads wait a round trip over NVLink, so each program keeps two tiles of rows in flight (the
        # next tile's reads are issued before this one is stored) and has the indices of the tile after that
        # at hand (their loads overlap the reads too). The companion's rows are read with the tile's.
        rows, live, base, row = _pull_tile(out_row, source, src_row, positions, num_rows)
        values = _pull_load(ws, base, row, live, region, pitch, cols, WORDS)
        if WORDS2 > 0:
            narrow = _pull_load(ws, base, row, live, region2, pitch2, cols2, WORDS2)
        next_rows, next_live, next_base, next_row = _pull_tile(out_row, source, src_row, positions + step, num_rows)
        for _ in range(tl.program_id(0) * ROWS, num_rows, step):
            upcoming = _pull_load(ws, next_base, next_row, next_live, region, pitch, cols, WORDS)
            if WORDS2 > 0:
                upcoming_narrow = _pull_load(ws, next_base, next_row, next_live, region2, pitch2, cols2, WORDS2)
            later_rows, later_live, later_base, later_row = _pull_tile(
                out_row, source, src_row, positions + 2 * step, num_rows
            )
            _pull_store(out, values, rows, live, out_stride, cols, WORDS, OUT_ALIGNED)
            if WORDS2 > 0:
                _pull_store(out2, narrow, rows, live, stride2, cols2, WORDS2, OUT2_ALIGNED)
                narrow = upcoming_narrow
            values, rows, live = upcoming, next_rows, next_live
            next_rows, next_live, next_base, next_row = later_rows, later_live, later_base, later_row
            positions += step
    else:
        for _ in range(tl.program_id(0) * ROWS, num_rows, step):
            rows, live, base, row = _pull_tile(out_row, source, src_row, positions, num_rows)
            for start in tl.static_range(0, WORDS, BLOCK):
                values = _pull_load(ws, base, row, live, region, pitch, start + cols, WORDS)
                _pull_store(out, values, rows, live, out_stride, start + cols, WORDS, OUT_ALIGNED)
            if WORDS2 > 0:
                narrow = _pull_load(ws, base, row, live, region2, pitch2, cols2, WORDS2)
                _pull_store(out2, narrow, rows, live, stride2, cols2, WORDS2, OUT2_ALIGNED)
            positions += step


COMPANION_MAX_WORDS = 256  # a second tensor this narrow (1 KB rows: scales, packed small fields, weights) rides along


@functools.cache
def tile_shape(words: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps) of a push or pull tile: up to 8192 words of a row per step (whole rows up to 32 KB)
    and about 16384 words in all (32 registers per thread at 16 warps, twice that with the prefetched tile), so
    wide rows go a few at a time and narrow ones many at once. Measured at 20 SMs on H200 for 4096 x 7168 bf16
    rows: a 4xH200 cached dispatch's pull 0.52 ms against 0.67 with 2 x 4096-word tiles at 8 warps; a 2xH200
    combine's push kernel 175 us against 196."""
    block = min(8192, triton.next_power_of_2(max(words, 1)))
    rows = max(1, min(64, 16384 // block))
    return rows, block, 16 if rows * block >= 16384 else 8
