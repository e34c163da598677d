"""Triton kernels of the cuda backend's low-latency mode (the design is in docs/CUDA.md).

Every kernel addresses this rank's symmetric workspace as int32 words (`ws`); a peer's workspace is
`ws + peer_delta[peer]` (the distance between the two mappings, in words). No kernel reads anything on the
host, so every launch is CUDA-graph capturable; the call counters live on the device.

Workspace regions, two copies of each that alternate with the parity of the call counter (`LowLatencyLayout`
in deep_ep/backends/cuda_low_latency.py computes the offsets):
- dispatch messages `[R*T, PITCH]`: row `s*T + t` holds rank s's token t, once however many of this rank's
  experts the token chose (every local expert that chose it reads the same row);
- dispatch flags `[L, R*T]`: `seq + 1` in slot `(l, s*T + t)` when rank s's token t chose local expert l in the
  call numbered `seq` (stale values from earlier calls never equal it, so nothing has to be cleared), then
  dispatch meta `[L, R*T]`: `t*K + k`;
- combine rows `[T*K, H]` bf16: row `t*K + k` is the expert output for this rank's token t, choice k.

The combine's float arithmetic is spelled out so that it is SPEC 6.3's on the GPU and in Triton's CPU
interpreter alike: bf16 -> fp32 by shifting bits, one rounded multiply then one rounded add per choice (the
launch turns FMA contraction off), and fp32 -> bf16 round-to-nearest-even computed on the bits.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ll_dispatch_push_kernel(
    payload,  # int32 words [N, WORDS]: each token's message body (x bytes, then scale bytes)
    topk,  # int64 [N, K]
    ws,  # int32 words: this rank's workspace
    peer_delta,  # int64 [R], multiples of 4 words
    seq_ptr,  # int32 [2]: the dispatch call counter, then the copy of it that the receive kernel reads
    rank,
    payload_stride,
    TOKENS_CAP: tl.constexpr,
    EXPERTS_PER_RANK: tl.constexpr,
    SLOTS: tl.constexpr,  # L * R * T
    MSG_SIZE: tl.constexpr,  # words of one parity's messages (they start at word 0)
    FLAG_BASE: tl.constexpr,
    FLAG_SIZE: tl.constexpr,  # words of one parity's flags + meta
    PITCH: tl.constexpr,
    WORDS: tl.constexpr,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (t, k) flags token t in the slot of its k-th expert on that expert's rank; the first of the token's
    choices on that rank also writes the token's message into the rank's row for it."""
    token = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    expert = tl.load(topk + token * K + k)
    seq = tl.load(seq_ptr)
    if token == 0 and k == 0:
        tl.store(seq_ptr + 1, seq)  # for the receive kernel, which advances the counter (see there)
    if expert >= 0:
        parity = (seq & 1).to(tl.int64)
        dest = expert // EXPERTS_PER_RANK
        row = rank * TOKENS_CAP + token
        delta = tl.load(peer_delta + dest)
        # Earlier choices of this token on the same rank: the row is theirs to send (-1 choices name no rank).
        ks = tl.arange(0, K_POW2)
        earlier = tl.load(topk + token * K + ks, mask=ks < k, other=-1)
        repeats = tl.sum(((earlier >= 0) & (earlier // EXPERTS_PER_RANK == dest)).to(tl.int32), axis=0)
        if repeats == 0:
            # Every term is a multiple of 4 words, so each row starts 16-byte aligned: vector stores over NVLink.
            target = tl.multiple_of(delta + parity * MSG_SIZE + row * PITCH, 4)
            source = tl.multiple_of(token * payload_stride, 4) if WORDS % 4 == 0 else token * payload_stride
            for start in tl.static_range(0, WORDS, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < WORDS
                tl.store(ws + target + cols, tl.load(payload + source + cols, mask=mask), mask=mask)
        rows_per_expert: tl.constexpr = SLOTS // EXPERTS_PER_RANK
        slot = (expert % EXPERTS_PER_RANK) * rows_per_expert + row
        flags = FLAG_BASE + parity * FLAG_SIZE + delta
        tl.store(ws + flags + slot, seq + 1)
        tl.store(ws + flags + SLOTS + slot, (token * K + k).to(tl.int32))


@triton.jit
def ll_dispatch_receive_kernel(
    ws,
    seq_ptr,  # int32 [2]: the dispatch call counter, then the push kernel's copy of it
    recv_x,  # int32 words [L * R*T, X_WORDS]
    scales,  # int32 words: recv_scales (any strides), or a dummy when SCALE_WORDS == 0
    recv_count,  # int32 [L]
    layout_range,  # int64 [L, R]
    src_info,  # int32 [L, R*T]
    route_count,  # int32 [L]: the backend's own copy of recv_count, for combine
    route_target,  # int32 [L, R*T]: s * T*K + t*K + k of each received row, for combine
    tokens_cap,
    rows_per_expert,  # R * T
    slots,
    msg_base,
    msg_size,
    flag_base,
    flag_size,
    scale_stride_expert,
    scale_stride_row,
    scale_stride_word,
    PITCH: tl.constexpr,
    X_WORDS: tl.constexpr,
    SCALE_WORDS: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    R: tl.constexpr,
    K: tl.constexpr,
    BLOCK_SLOTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (l, j) copies rows j, j + G, j + 2G, ... of local expert l (G = grid dim 1) into the outputs.

    Row p of expert l is the p-th flagged slot in slot order (source ascending, token ascending: SPEC 6).
    Program (0, 0) also advances the call counter: every program here reads the push kernel's copy of it, and
    the counter's own readers are earlier kernels on the stream, so no separate launch and no atomic.
    """
    expert = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    seq = tl.load(seq_ptr + 1)
    if expert == 0 and part == 0:
        tl.store(seq_ptr, seq + 1)
    parity = (seq & 1).to(tl.int64)
    messages = ws + msg_base + parity * msg_size
    flags = ws + flag_base + parity * flag_size
    offs = tl.arange(0, BLOCK_SLOTS)
    in_range = offs < rows_per_expert
    flag = tl.load(flags + expert * rows_per_expert + offs, mask=in_range, other=0)
    valid = ((flag == seq + 1) & in_range).to(tl.int32)
    inclusive = tl.cumsum(valid, axis=0)
    count = tl.sum(valid, axis=0)
    if part == 0:
        tl.store(recv_count + expert, count)
        tl.store(route_count + expert, count)
        for source in tl.static_range(R):
            mine = (offs >= source * tokens_cap) & (offs < (source + 1) * tokens_cap)
            begin = tl.sum(tl.where(offs < source * tokens_cap, valid, 0), axis=0).to(tl.int64)
            size = tl.sum(tl.where(mine, valid, 0), axis=0).to(tl.int64)
            tl.store(layout_range + expert * R + source, (begin << 32) | size)
    for row in range(part, count, parts):
        # The slot holding row `row`: the number of slots whose inclusive count is <= row.
        slot = tl.sum(((inclusive <= row) & in_range).to(tl.int32), axis=0).to(tl.int64)
        source_msg = messages + slot * PITCH  # the token's one row, shared by the experts that chose it
        out_row = expert * rows_per_expert + row
        for start in tl.static_range(0, X_WORDS, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < X_WORDS
            tl.store(recv_x + out_row * X_WORDS + cols, tl.load(source_msg + cols, mask=mask), mask=mask)
        if SCALE_WORDS > 0:
            words = tl.arange(0, SCALE_BLOCK)
            mask = words < SCALE_WORDS
            values = tl.load(source_msg + X_WORDS + words, mask=mask)
            target = scales + expert * scale_stride_expert + row * scale_stride_row + words * scale_stride_word
            tl.store(target, values, mask=mask)
        meta = tl.load(flags + slots + expert * rows_per_expert + slot)
        tl.store(src_info + out_row, (slot % tokens_cap).to(tl.int32))
        tl.store(route_target + out_row, ((slot // tokens_cap) * tokens_cap * K + meta).to(tl.int32))


@triton.jit
def ll_combine_push_kernel(
    y,  # int32 words: x of low_latency_combine, [L, R*T, H] bf16
    ws,
    peer_delta,
    seq_ptr,  # int32 [2]: the combine call counter, then the copy of it that the reduce kernel reads
    route_count,
    route_target,
    rows_per_expert,
    y_stride_expert,  # words
    y_stride_row,  # words
    rows_base,
    rows_size,  # words of one parity's combine rows
    TK: tl.constexpr,
    H_WORDS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (l, j) sends rows j, j + G, ... of local expert l back to the ranks their tokens came from."""
    expert = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    seq = tl.load(seq_ptr)
    if expert == 0 and part == 0:
        tl.store(seq_ptr + 1, seq)  # for the reduce kernel, which advances the counter
    parity = (seq & 1).to(tl.int64)
    count = tl.load(route_count + expert)
    for row in range(part, count, parts):
        target = tl.load(route_target + expert * rows_per_expert + row).to(tl.int64)
        delta = tl.load(peer_delta + target // TK)
        dest = delta + rows_base + parity * rows_size + (target % TK) * H_WORDS
        if H_WORDS % 4 == 0:  # rows start 16-byte aligned on both sides: vector loads and stores
            dest = tl.multiple_of(dest, 4)
        dest = ws + dest
        source = y + expert * y_stride_expert + row * y_stride_row
        for start in tl.static_range(0, H_WORDS, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < H_WORDS
            tl.store(dest + cols, tl.load(source + cols, mask=mask), mask=mask)


@triton.jit
def ll_combine_reduce_kernel(
    ws16,  # int16 view of this rank's workspace
    seq_ptr,  # int32 [2]: the combine call counter, then the push kernel's copy of it
    topk,  # int64 [N, K]
    weights,  # float32 [N, K]
    out,  # int16 view of the bf16 output [N, H]
    out_stride,
    hidden,
    rows_base16,  # in int16 elements
    rows_size16,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[t] = bf16(sum over valid k, in k order, of fp32(w[t, k]) * fp32(row(t, k))), from +0.0. Program (0, 0)
    advances the call counter (as the dispatch's receive kernel does)."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    seq = tl.load(seq_ptr + 1)
    if token == 0 and tl.program_id(1) == 0:
        tl.store(seq_ptr, seq + 1)
    parity = (seq & 1).to(tl.int64)
    rows = ws16 + rows_base16 + parity * rows_size16
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # No branch per choice, so the K row loads are all in flight at once. A skipped choice adds +0.0, which
    # leaves acc's bits unchanged: acc starts at +0.0 and a rounded sum is -0.0 only when both terms are, so acc
    # is never -0.0, and x + 0.0 == x for every other x (a NaN acc is already the quiet NaN the add returns).
    for k in tl.static_range(K):
        valid = tl.load(topk + token * K + k) >= 0
        weight = tl.load(weights + token * K + k)
        bits = tl.load(rows + (token * K + k) * hidden + cols, mask=mask, other=0)  # stale if not valid
        value = ((bits.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        acc = acc + tl.where(valid, weight * value, 0.0)
    tl.store(out + token * out_stride + cols, _bf16_bits(acc), mask=mask)


@triton.jit
def _bf16_bits(value):
    """The bf16 bits (as int16) of fp32 `value`, rounded to nearest even; NaN stays a quiet NaN."""
    bits = value.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(value != value, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.int16)


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def ll_fp8_payload_kernel(
    x,  # bf16 [N, H]
    payload_bytes,  # uint8 view of the payload [N, WORDS * 4]
    payload_words,  # int32 view of the same payload
    x_stride,
    payload_stride,  # words
    inv_fp8_max,  # float32: 1/448 as one float32 division (deep_ep.quant's constant)
    HIDDEN: tl.constexpr,
    NUM_SCALES: tl.constexpr,  # HIDDEN // 128
    BLOCK_SCALES: tl.constexpr,  # NUM_SCALES rounded up to a power of two
    ROUND_SCALE: tl.constexpr,
    UE8M0: tl.constexpr,
):
    """One program per token: SPEC 6.1's fp8 cast of the row (as deep_ep.quant.per_block_cast_to_fp8, bit for
    bit) written as the message body: H e4m3 bytes, then the float32 scales (or the UE8M0-packed int32s)."""
    token = tl.program_id(0).to(tl.int64)
    blocks = tl.arange(0, BLOCK_SCALES)
    lanes = tl.arange(0, 128)
    cols = blocks[:, None] * 128 + lanes[None, :]
    mask = cols < HIDDEN
    values = tl.load(x + token * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    # NaN propagates as in torch's amax / clamp_min / clamp (Triton's max and clamp would drop it).
    amax = tl.maximum(tl.reduce(tl.abs(values), 1, _max_keeping_nan), 1e-4, propagate_nan=tl.PropagateNan.ALL)
    if ROUND_SCALE:
        unrounded = amax * inv_fp8_max
        bits = unrounded.to(tl.int32, bitcast=True)
        exponent = (bits >> 23) & 0xFF
        rounded = ((exponent + ((bits & 0x7FFFFF) != 0).to(tl.int32)) << 23).to(tl.float32, bitcast=True)
        scale_inv = tl.where(exponent == 0xFF, unrounded, rounded)  # infinity and NaN as they are (quant._pow2_ceil)
        scale = tl.math.div_rn(tl.full([BLOCK_SCALES], 1.0, tl.float32), scale_inv)
    else:
        scale_inv = amax * inv_fp8_max
        scale = tl.math.div_rn(tl.full([BLOCK_SCALES], 448.0, tl.float32), amax)
    product = values * scale[:, None]
    q = tl.clamp(product, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    # torch's cast writes a NaN as 0x7F with the float32's sign bit; the hardware's cast gives 0x7F for any NaN.
    nan_code = (0x7F | ((product.to(tl.int32, bitcast=True) >> 24) & 0x80)).to(tl.uint8)
    q = tl.where(product != product, nan_code, q)
    row = payload_bytes + token * payload_stride * 4
    tl.store(row + cols, q, mask=mask)
    scale_row = payload_words + token * payload_stride + HIDDEN // 4
    if UE8M0:
        exponents = tl.reshape((scale_inv.to(tl.int32, bitcast=True) >> 23) & 0xFF, [BLOCK_SCALES // 4, 4])
        packed = tl.sum(exponents << (tl.arange(0, 4) * 8)[None, :], axis=1)
        words = tl.arange(0, BLOCK_SCALES // 4)
        tl.store(scale_row + words, packed, mask=words < NUM_SCALES // 4)
    else:
        tl.store(scale_row + blocks, scale_inv.to(tl.int32, bitcast=True), mask=blocks < NUM_SCALES)
