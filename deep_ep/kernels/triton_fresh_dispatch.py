"""Triton kernels of the cuda backend's fresh dispatch: its bookkeeping in three launches instead of ~40 small torch
operations (each 10-20 us of host time on a GPU host, and a fresh dispatch is paced by the host).

`count_kernel`, before the count exchange: this rank's row of it (tokens per destination, per (destination,
channel), per expert, the range of the expert ids, the token count), as the reference's `_count_row`.
`route_kernel`, once the count exchange is on the device: for every (token t, destination d) the running count of
tokens 0..t sent to d, and from it DeepEP's `send_head`, the push kernel's destination row and the route's
`send_tokens` (the torch code: `running_count`, `_send_head` and `nonzero` in the reference, `dispatch_push_plan` in
the cuda backend).
`unpack_kernel`, once the packed per-token fields have arrived: the source index, and topk_idx / topk_weights
made local (ids of this rank's experts shifted to 0..L-1, others -1 with weight +0.0), as the reference's unpack.
All three produce the same bits as the torch code they replace (tests/test_cuda_backend.py compares them).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def count_kernel(
    in_rank,  # uint8 [N, R]: is_token_in_rank's bytes, strides (in_stride_t, in_stride_d)
    per_rank,  # [R] num_tokens_per_rank (an integer dtype), stride per_rank_stride
    per_expert,  # [E] num_tokens_per_expert (an integer dtype), stride per_expert_stride
    topk_idx,  # [N, K] (int32 or int64), strides (idx_stride_t, idx_stride_k) (read when K > 0)
    row,  # int32 [R + R * C + E + 3] out, filled with -1 before the launch: the count exchange's row
    num_tokens,
    in_stride_t,
    in_stride_d,
    per_rank_stride,
    num_experts,
    per_expert_stride,
    idx_stride_t,
    idx_stride_k,
    tokens_per_channel,
    num_channels,
    R: tl.constexpr,
    R_POW2: tl.constexpr,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per channel (a range of tokens): the host waits for this kernel right after it, and one program
    # scanning every token took 125 us at 4096 tokens on an H200 (a few us this way).
    c = tl.program_id(0)
    peers = tl.arange(0, R_POW2)
    begin = c * tokens_per_channel
    end = tl.minimum(begin + tokens_per_channel, num_tokens)
    sent = tl.zeros((R_POW2,), dtype=tl.int32)  # this channel's tokens per destination
    for start in range(begin, end, BLOCK):
        t = start + tl.arange(0, BLOCK)
        cell = (t < end)[:, None] & (peers < R)[None, :]
        at = t.to(tl.int64)[:, None] * in_stride_t + peers[None, :] * in_stride_d
        sent += tl.sum((tl.load(in_rank + at, mask=cell, other=0) != 0).to(tl.int32), 0)
    tl.store(row + R + peers * num_channels + c, sent, mask=peers < R)
    counts_end = R + R * num_channels
    if K > 0:
        # The range of this channel's expert ids, clamped to [-2, E], merged into the row's two slots (which start
        # at -1): the range of every id and -1, as DispatchArgs.expert_id_range.
        low = tl.full((), 1 << 62, dtype=tl.int64)
        high = tl.full((), -(1 << 62), dtype=tl.int64)
        k = tl.arange(0, K_POW2)
        for start in range(begin, end, BLOCK):
            t = start + tl.arange(0, BLOCK)
            cell = (t < end)[:, None] & (k < K)[None, :]
            ids = tl.load(topk_idx + t.to(tl.int64)[:, None] * idx_stride_t + k[None, :] * idx_stride_k, mask=cell).to(
                tl.int64
            )
            low = tl.minimum(low, tl.min(tl.min(tl.where(cell, ids, 1 << 62), 1), 0))
            high = tl.maximum(high, tl.max(tl.max(tl.where(cell, ids, -(1 << 62)), 1), 0))
        tl.atomic_min(row + counts_end + num_experts, tl.minimum(tl.maximum(low, -2), num_experts).to(tl.int32))
        tl.atomic_max(row + counts_end + num_experts + 1, tl.minimum(tl.maximum(high, -2), num_experts).to(tl.int32))
    if c == 0:  # the counts given by the caller, and the token count
        tl.store(row + peers, tl.load(per_rank + peers * per_rank_stride, mask=peers < R).to(tl.int32), mask=peers < R)
        for start in range(0, num_experts, BLOCK):
            e = start + tl.arange(0, BLOCK)
            tl.store(
                row + counts_end + e,
                tl.load(per_expert + e.to(tl.int64) * per_expert_stride, mask=e < num_experts).to(tl.int32),
                mask=e < num_experts,
            )
        tl.store(row + counts_end + num_experts + 2, num_tokens)


@triton.jit
def route_kernel(
    in_rank,  # uint8 [N, R]: is_token_in_rank's bytes, strides (in_stride_t, in_stride_d)
    rank_prefix,  # int32 [R, R]: DeepEP's rank_prefix_matrix, [s][d] = tokens sent to d by ranks 0..s
    channel_base,  # int32 [C, R]: 1 + the tokens sent to d before channel c starts
    send_head,  # int32 [N, R] out: position of (t, d) in its (channel, d) stream, or -1
    dest,  # int32 [N, R] out: the row (t, d) takes in rank d's region of the push, or -1
    send_tokens,  # int64 [sum of this rank's sends] out: the token of each sent row, by d, then t
    num_tokens,
    in_stride_t,
    in_stride_d,
    tokens_per_channel,
    rank,
    R: tl.constexpr,
    R_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    d = tl.program_id(0)  # one program per destination: its column's running count is a scan over the tokens
    peers = tl.arange(0, R_POW2)
    mine = tl.load(rank_prefix + rank * R + peers, mask=peers < R, other=0)
    # Rows of ranks 0..rank-1 (none for rank 0: its row -1 is read as row 0 and zeroed, integer arithmetic only).
    lower = tl.load(rank_prefix + tl.maximum(rank - 1, 0) * R + peers, mask=peers < R, other=0) * tl.minimum(rank, 1)
    sent = mine - lower  # this rank's rows to each destination
    send_begin = tl.sum(tl.where(peers < d, sent, 0), 0)  # where d's block starts in send_tokens
    first_row = tl.sum(tl.where(peers == d, lower, 0), 0)  # rows of lower sources ahead of ours at d
    carry = tl.zeros((), dtype=tl.int32)
    for start in range(0, num_tokens, BLOCK):
        t = start + tl.arange(0, BLOCK)
        live = t < num_tokens
        hit = (tl.load(in_rank + t.to(tl.int64) * in_stride_t + d * in_stride_d, mask=live, other=0) != 0).to(tl.int32)
        running = carry + tl.cumsum(hit, 0)
        chosen = hit != 0
        base = tl.load(channel_base + (t // tokens_per_channel) * R + d, mask=live, other=0)
        at = t.to(tl.int64) * R + d
        tl.store(send_head + at, tl.where(chosen, running - base, -1), mask=live)
        tl.store(dest + at, tl.where(chosen, first_row + running - 1, -1), mask=live)
        tl.store(send_tokens + send_begin + running - 1, t.to(tl.int64), mask=live & chosen)
        carry += tl.sum(hit, 0)


@triton.jit
def unpack_kernel(
    words,  # int32: the received packed rows as words, row stride `row_stride`
    recv_topk_idx,  # [M, K] out, int64 (IDX64) or int32
    recv_weight_bits,  # int32 [M, K] out: the float32 weights' bits
    recv_src,  # int32 [M] out: each row's token index at its source
    num_rows,
    row_stride,  # words
    idx_word,  # word offset of topk_idx in a packed row
    weight_word,  # word offset of topk_weights
    src_word,  # word offset of the source index
    first_expert,  # rank * L: this rank's experts are [first_expert, first_expert + L)
    local_experts,  # L
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    IDX64: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = rows < num_rows
    row_words = rows.to(tl.int64) * row_stride
    tl.store(recv_src + rows, tl.load(words + row_words + src_word, mask=live), mask=live)
    k = tl.arange(0, K_POW2)
    cell = live[:, None] & (k < K)[None, :]
    at = row_words[:, None] + k[None, :]
    if IDX64:
        # An id in this rank's range is a small non-negative int64: high word 0, low word in range.
        low = tl.load(words + row_words[:, None] + idx_word + 2 * k[None, :], mask=cell, other=-1)
        high = tl.load(words + row_words[:, None] + idx_word + 2 * k[None, :] + 1, mask=cell, other=-1)
        local = (high == 0) & (low >= first_expert) & (low < first_expert + local_experts)
        ids = tl.where(local, low - first_expert, -1).to(tl.int64)
    else:
        low = tl.load(words + at + idx_word, mask=cell, other=-1)
        local = (low >= first_expert) & (low < first_expert + local_experts)
        ids = tl.where(local, low - first_expert, -1)
    out = rows.to(tl.int64)[:, None] * K + k[None, :]
    tl.store(recv_topk_idx + out, ids, mask=cell)
    weights = tl.load(words + at + weight_word, mask=cell, other=0)
    tl.store(recv_weight_bits + out, tl.where(local, weights, 0), mask=cell)  # +0.0 is all-zero bits
