"""Triton kernel of the cuda backend's normal mode: rows pushed straight into peer workspaces over NVLink,
received by the same launch on every rank while they arrive.

One kernel serves dispatch, cached dispatch and combine. Every rank's workspace is addressed as int32 words
from this rank's (`ws`); rank d's lies at `ws + peer_delta[d]` (deep_ep/backends/peer_memory.py). A launch
moves one tensor's rows: row i goes, for every rank d with `dest[i, d] >= 0`, to row `dest[i, d]` of the
region that starts at word `region` of rank d's workspace. A dispatch row may go to several ranks (it is
read once and stored to each); a combine row goes home to one.

The grid has two kinds of programs (docs/CUDA.md, "The push kernel"):
- **pushers** (`pid < pushers`): a persistent grid over tiles of ROWS rows, taken in PHASES phases of
  consecutive tiles. Each program loads its next tile before it stores the current one. After each phase every
  pusher counts itself in (a CTA barrier, then one system-scope acquire-release add on a counter of this rank);
  the one that arrives last publishes the phase to every destination d: one int64 flag in d's workspace, slot
  of this rank, holding `(epoch << 32) | rows`, where rows is how many of this rank's rows for d have landed
  (the rows of a phase are a prefix of the rows for each destination, so one count says which).
- **receivers** (the others): poll this rank's flags (system-scope acquire) until every source has published
  this launch's epoch and all its rows. With COPY they meanwhile copy each newly landed row into the output
  (`out`, addressed from `ws` like a peer, rows numbered as in the region); this rank's own rows are stored
  straight into the output by its pushers. Without COPY, one receiver only waits, and the caller reads the
  region after the launch.
Rows are taken in `order` where one is given: a combine's rows come grouped by destination, and taken in that
order every rank would write to the same destination at the same time; the combine's order interleaves them.
Workspace rows start 16-byte aligned (region and pitch are multiples of 4 words, the deltas are checked), so the
stores are 16-byte vectors when the source rows are aligned too.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl


@triton.jit
def _tile_rows(order, positions, limit, HAS_ORDER: tl.constexpr):
    """The source rows a tile of processing `positions` covers (`order[position]`, or the position itself)."""
    if HAS_ORDER:
        return tl.load(order + positions, mask=positions < limit, other=0).to(tl.int64)
    return positions


@triton.jit
def _load_rows(src, rows, live, src_stride, col, WORDS: tl.constexpr, SRC_ALIGNED: tl.constexpr):
    source = rows * src_stride
    if SRC_ALIGNED:
        source = tl.multiple_of(source, 4)
    mask = live[:, None] & (col < WORDS)[None, :]
    return tl.load(src + source[:, None] + col[None, :], mask=mask)


@triton.jit
def _store_rows(
    values, rows, live, col, dest, ws, peer_delta, region, pitch, out_delta, out_stride, rank,
    R: tl.constexpr, WORDS: tl.constexpr, COPY: tl.constexpr,
):  # fmt: skip
    mask = live[:, None] & (col < WORDS)[None, :]
    for d in tl.static_range(R):
        row = tl.load(dest + rows * R + d, mask=live, other=-1).to(tl.int64)
        target = tl.load(peer_delta + d) + region + row * pitch
        if COPY:  # this rank's own rows go straight into the output (its rows are numbered as the region's)
            target = tl.where(d == rank, out_delta + row * out_stride, target)
        target = tl.multiple_of(target, 4)
        tl.store(ws + target[:, None] + col[None, :], values, mask=mask & (row >= 0)[:, None])


@triton.jit
def _publish_phase(ws, flags, peer_delta, counters, flag_slot, done, phase, epoch, rank, pushers, R: tl.constexpr):
    """Count this pusher in for `phase`; the last one tells every destination how many rows have landed."""
    # The barrier orders every thread's stores of the phase before this thread's release (cumulativity).
    tl.debug_barrier()
    arrived = tl.atomic_add(ws + counters + phase, 1, sem="acq_rel", scope="sys")
    if arrived == pushers - 1:
        tl.atomic_xchg(ws + counters + phase, 0, sem="relaxed", scope="gpu")  # ready for this slot's next use
        for d in tl.static_range(R):
            value = (tl.cast(epoch, tl.int64) << 32) | tl.load(done + phase * R + d).to(tl.int64)
            slot = tl.load(peer_delta + d) // 2 + flag_slot + rank
            tl.atomic_xchg(flags + slot, value, sem="release", scope="sys")


@triton.jit
def _push(
    src, dest, order, ws, flags, peer_delta, region, num_rows, src_stride, pitch, out_delta, out_stride, counters,
    flag_slot, done, epoch, rank, pushers, phase_tiles,
    R: tl.constexpr, WORDS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SRC_ALIGNED: tl.constexpr,
    HAS_ORDER: tl.constexpr, COPY: tl.constexpr, PHASES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(num_rows, ROWS)
    cols = tl.arange(0, BLOCK)
    lane = tl.arange(0, ROWS)
    step = pushers * ROWS
    for phase in range(PHASES):
        first = phase * phase_tiles + pid
        end = tl.minimum((phase + 1) * phase_tiles, num_tiles)
        limit = tl.minimum(end * ROWS, num_rows).to(tl.int64)
        positions = (first * ROWS + lane).to(tl.int64)
        if WORDS <= BLOCK:
            # Whole rows per tile, and the next tile is loaded before this one is stored: two tiles in flight.
            rows = _tile_rows(order, positions, limit, HAS_ORDER)
            values = _load_rows(src, rows, positions < limit, src_stride, cols, WORDS, SRC_ALIGNED)
            for _ in range(first, end, pushers):
                upcoming_rows = _tile_rows(order, positions + step, limit, HAS_ORDER)
                live = positions + step < limit
                upcoming = _load_rows(src, upcoming_rows, live, src_stride, cols, WORDS, SRC_ALIGNED)
                _store_rows(
                    values, rows, positions < limit, cols, dest, ws, peer_delta, region, pitch, out_delta,
                    out_stride, rank, R, WORDS, COPY,
                )  # fmt: skip
                values = upcoming
                rows = upcoming_rows
                positions += step
        else:
            for _ in range(first, end, pushers):
                rows = _tile_rows(order, positions, limit, HAS_ORDER)
                live = positions < limit
                for start in tl.static_range(0, WORDS, BLOCK):
                    values = _load_rows(src, rows, live, src_stride, start + cols, WORDS, SRC_ALIGNED)
                    _store_rows(
                        values, rows, live, start + cols, dest, ws, peer_delta, region, pitch, out_delta,
                        out_stride, rank, R, WORDS, COPY,
                    )  # fmt: skip
                positions += step
        _publish_phase(ws, flags, peer_delta, counters, flag_slot, done, phase, epoch, rank, pushers, R)


@triton.jit
def _copy_tile(ws, region, pitch, out_delta, out_stride, block, tile, lo, hi, lane, c, WORDS: tl.constexpr):
    """Copy tile `tile` (rows tile*CROWS + lane of a source's block, clipped to [lo, hi)): where its rows are in the
    region, where they go in the output, and which words are live."""
    r = tile * lane.shape[0] + lane
    row = (block + r).to(tl.int64)
    source = tl.multiple_of(region + row * pitch, 4)
    target = tl.multiple_of(out_delta + row * out_stride, 4)
    mask = ((r >= lo) & (r < hi))[:, None] & (c < WORDS)[None, :]
    return source, target, mask


@triton.jit
def _copy_rows(
    ws, region, pitch, out_delta, out_stride, block, lo, hi, receiver, receivers,
    WORDS: tl.constexpr, CROWS: tl.constexpr, CBLOCK: tl.constexpr,
):  # fmt: skip
    """Rows [lo, hi) of one source's block (region row `block` onwards) into the output: the tiles of CROWS rows
    whose index is `receiver` modulo `receivers`, so every receiver takes a share of each newly landed stretch.
    Whole rows: the next tile is loaded before this one is stored (two tiles in flight). The loads are .cg: read
    at L2, where peers' NVLink writes land, never a line this SM cached earlier."""
    first = lo // CROWS
    tile = first + ((receiver - first % receivers) % receivers + receivers) % receivers
    lane = tl.arange(0, CROWS)
    cols = tl.arange(0, CBLOCK)
    if WORDS <= CBLOCK:
        source, _, mask = _copy_tile(ws, region, pitch, out_delta, out_stride, block, tile, lo, hi, lane, cols, WORDS)
        values = tl.load(ws + source[:, None] + cols[None, :], mask=mask, cache_modifier=".cg")
        for t in range(tile, tl.cdiv(hi, CROWS), receivers):
            upcoming, _, ahead = _copy_tile(
                ws, region, pitch, out_delta, out_stride, block, t + receivers, lo, hi, lane, cols, WORDS
            )  # fmt: skip
            later = tl.load(ws + upcoming[:, None] + cols[None, :], mask=ahead, cache_modifier=".cg")
            _, target, mask = _copy_tile(ws, region, pitch, out_delta, out_stride, block, t, lo, hi, lane, cols, WORDS)
            tl.store(ws + target[:, None] + cols[None, :], values, mask=mask)
            values = later
    else:
        for t in range(tile, tl.cdiv(hi, CROWS), receivers):
            for start in tl.static_range(0, WORDS, CBLOCK):
                c = start + cols
                source, target, mask = _copy_tile(
                    ws, region, pitch, out_delta, out_stride, block, t, lo, hi, lane, c, WORDS
                )  # fmt: skip
                values = tl.load(ws + source[:, None] + c[None, :], mask=mask, cache_modifier=".cg")
                tl.store(ws + target[:, None] + c[None, :], values, mask=mask)


@triton.jit
def _now(INTERPRET: tl.constexpr):
    if INTERPRET:  # Triton's CPU interpreter has no clock register (and the tests have their own deadlines)
        return 0
    else:
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _receive(
    ws, flags, region, pitch, out_delta, out_stride, flag_slot, expect, base, epoch, rank, receiver, receivers,
    timeout_ns,
    R: tl.constexpr, RP: tl.constexpr, WORDS: tl.constexpr, CROWS: tl.constexpr, CBLOCK: tl.constexpr,
    COPY: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    source = tl.arange(0, RP)
    valid = source < R
    want = tl.load(expect + source, mask=valid, other=0)
    if COPY:
        want = tl.where(source == rank, 0, want)  # this rank's pushers stored its own rows in the output
    seen = tl.zeros([RP], dtype=tl.int32)
    started = _now(INTERPRET)
    waiting = True
    while waiting:
        flag = tl.atomic_add(flags + flag_slot + source, 0, mask=valid, sem="acquire", scope="sys")
        current = (flag >> 32) == tl.cast(epoch, tl.int64)
        landed = tl.where(current & valid, (flag & 0xFFFFFFFF).to(tl.int32), 0)
        if COPY:
            for s in tl.static_range(R):
                lo = tl.sum(tl.where(source == s, seen, 0))
                hi = tl.sum(tl.where(source == s, tl.minimum(landed, want), 0))
                if hi > lo:
                    _copy_rows(
                        ws, region, pitch, out_delta, out_stride, tl.load(base + s), lo, hi, receiver, receivers,
                        WORDS, CROWS, CBLOCK,
                    )  # fmt: skip
            seen = tl.maximum(seen, tl.minimum(landed, want))
        # Every source must have started this launch (its epoch), not only sent its rows: that is what lets the
        # next launch on the other half of the workspace, two calls on, overwrite what this one left there.
        waiting = tl.sum((valid & ~(current & (landed >= want))).to(tl.int32)) > 0
        if not INTERPRET:
            if waiting & (_now(INTERPRET) - started > timeout_ns):
                tl.inline_asm_elementwise("trap;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


# Values that change from call to call are not specialised on (Triton would compile a variant for 1 and for
# multiples of 16): one compiled kernel per shape.
@triton.jit(do_not_specialize=["out_delta", "counters", "flag_slot", "epoch", "rank", "pushers"])
def push_rows_kernel(
    src,  # int32 words: the rows being sent, [num_rows, WORDS] with row stride `src_stride`
    dest,  # int32 [num_rows, R]: the row each source row takes in rank d's region, or -1
    order,  # int32 [num_rows]: the source row at each processing position (read when HAS_ORDER)
    ws,  # int32 words: this rank's workspace
    flags,  # the same workspace as int64 words (the flags)
    peer_delta,  # int64 [R]: int32 words from `ws` to rank d's workspace, multiples of 4
    region,  # word offset of the region in every rank's workspace, a multiple of 4
    num_rows,
    src_stride,  # words
    pitch,  # words per workspace row, a multiple of 4
    out_delta,  # COPY: words from `ws` to the output's first row (a multiple of 4)
    out_stride,  # COPY: words per output row (a multiple of 4)
    counters,  # word offset of this launch's PHASES counters in this rank's workspace (zero between launches)
    flag_slot,  # int64-word offset of this launch's flags, one per source rank, in every rank's workspace
    done,  # int32 [PHASES, R]: this rank's rows for d processed once phase k is over (a prefix of them)
    expect,  # int32 [R]: rows this rank receives from each source
    base,  # int32 [R]: the region row where each source's rows start
    epoch,  # this call's number, > 0, equal on every rank
    rank,
    pushers,  # programs that push; the rest receive
    phase_tiles,  # tiles per phase
    timeout_ns,  # receivers trap after waiting this long (a peer that never arrives)
    R: tl.constexpr,
    RP: tl.constexpr,  # R rounded up to a power of two
    WORDS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    SRC_ALIGNED: tl.constexpr,  # source rows start 16-byte aligned
    HAS_ORDER: tl.constexpr,
    COPY: tl.constexpr,  # receivers copy landed rows into the output
    CROWS: tl.constexpr,
    CBLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    PHASES: tl.constexpr,  # runs of tiles a pusher signals after (deep_ep.backends.cuda.PHASES)
):
    pid = tl.program_id(0)
    if pid < pushers:
        _push(
            src, dest, order, ws, flags, peer_delta, region, num_rows, src_stride, pitch, out_delta, out_stride,
            counters, flag_slot, done, epoch, rank, pushers, phase_tiles,
            R, WORDS, ROWS, BLOCK, SRC_ALIGNED, HAS_ORDER, COPY, PHASES,
        )  # fmt: skip
    else:
        _receive(
            ws, flags, region, pitch, out_delta, out_stride, flag_slot, expect, base, epoch, rank, pid - pushers,
            tl.num_programs(0) - pushers, timeout_ns,
            R, RP, WORDS, CROWS, CBLOCK, COPY, INTERPRET,
        )  # fmt: skip


@functools.cache
def tile_shape(words: int) -> tuple[int, int]:
    """(ROWS, BLOCK) of a tile: up to 8192 words of a row per step (whole rows up to 32 KB) and about 8192 words
    in all (32 registers per thread at 8 warps, twice that with the prefetched tile), so wide rows go one or two
    at a time and narrow ones many at once."""
    block = min(8192, triton.next_power_of_2(max(words, 1)))
    return max(1, min(64, 8192 // block)), block
