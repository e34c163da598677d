"""Normal-mode layout, dispatch and combine (SPEC sections 3, 4 and 5) for all ranks at once.

Every function takes a list indexed by rank and returns a list indexed by rank. Plain loops over ranks
and tokens are used on purpose: this module is read as the statement of the semantics, and it only ever
runs on tiny shapes.
"""

from __future__ import annotations

import math

import torch

__all__ = ["cached_dispatch", "channel_range", "combine", "dispatch", "layout"]

NUM_RANKS_PER_NODE = 8  # SPEC 3: an RDMA "node" is 8 consecutive ranks

RecvX = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
Bias = torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None] | None


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def channel_range(channel: int, num_tokens: int, num_channels: int) -> tuple[int, int]:
    """Token range `[start, end)` of `channel` when `num_tokens` tokens are split into contiguous channels."""
    per_channel = (num_tokens + num_channels - 1) // num_channels
    start = min(per_channel * channel, num_tokens)
    end = min(start + per_channel, num_tokens)
    return start, end


def _check_topk_idx(topk_idx: torch.Tensor, num_experts: int, rank: int) -> None:
    if topk_idx.dim() != 2 or topk_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_idx[{rank}] must be int64/int32 [N, K], got {topk_idx.dtype} {tuple(topk_idx.shape)}")
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bool(bad.any()):
        value = int(topk_idx[bad][0])
        raise ValueError(f"topk_idx[{rank}] holds expert id {value} outside [-1, num_experts={num_experts})")


def _check_experts(num_experts: int, num_ranks: int) -> int:
    if num_ranks < 1:
        raise ValueError("at least one rank is needed")
    if num_experts <= 0 or num_experts % num_ranks != 0:
        raise ValueError(f"num_experts={num_experts} is not a positive multiple of num_ranks={num_ranks}")
    return num_experts // num_ranks


def layout(topk_idx: list[torch.Tensor], num_experts: int) -> list[dict]:
    """SPEC 3 (`get_dispatch_layout`) on every rank.

    `topk_idx[r]`: int64/int32 `[N_r, K]`, `-1` = no expert. Returns per rank a dict with
    `num_tokens_per_rank` (int32 `[R]`), `num_tokens_per_rdma_rank` (None if `R <= 8`, else int32
    `[ceil(R / 8)]`), `num_tokens_per_expert` (int32 `[E]`) and `is_token_in_rank` (bool `[N_r, R]`).
    """
    num_ranks = len(topk_idx)
    experts_per_rank = _check_experts(num_experts, num_ranks)
    num_nodes = math.ceil(num_ranks / NUM_RANKS_PER_NODE)
    results = []
    for rank, idx in enumerate(topk_idx):
        _check_topk_idx(idx, num_experts, rank)
        num_tokens = idx.shape[0]
        per_rank = [0] * num_ranks
        per_node = [0] * num_nodes
        per_expert = [0] * num_experts
        in_rank = [[False] * num_ranks for _ in range(num_tokens)]
        for t, row in enumerate(idx.tolist()):
            dest_ranks = set()
            for e in row:
                if e < 0:
                    continue
                per_expert[e] += 1  # every (t, k) counts
                dest_ranks.add(e // experts_per_rank)
            for d in dest_ranks:  # a token counts once per rank ...
                in_rank[t][d] = True
                per_rank[d] += 1
            for node in {d // NUM_RANKS_PER_NODE for d in dest_ranks}:  # ... and once per node
                per_node[node] += 1
        results.append(
            {
                "num_tokens_per_rank": torch.tensor(per_rank, dtype=torch.int32),
                "num_tokens_per_rdma_rank": (
                    None if num_ranks <= NUM_RANKS_PER_NODE else torch.tensor(per_node, dtype=torch.int32)
                ),
                "num_tokens_per_expert": torch.tensor(per_expert, dtype=torch.int32),
                "is_token_in_rank": torch.tensor(in_rank, dtype=torch.bool).reshape(num_tokens, num_ranks),
            }
        )
    return results


def _check_routing(is_token_in_rank: list[torch.Tensor]) -> None:
    num_ranks = len(is_token_in_rank)
    for s, m in enumerate(is_token_in_rank):
        if m.dim() != 2 or m.shape[1] != num_ranks or m.dtype != torch.bool:
            raise ValueError(f"is_token_in_rank[{s}] must be bool [N, R={num_ranks}], got {m.dtype} {tuple(m.shape)}")


def _receive_order(is_token_in_rank: list[torch.Tensor]) -> list[list[tuple[int, int]]]:
    """SPEC 4 row order: for each receiving rank, the `(source rank, token)` of each received row.

    Source ranks ascending; within a source, its tokens sent to the receiver in ascending token order.
    """
    _check_routing(is_token_in_rank)
    num_ranks = len(is_token_in_rank)
    order: list[list[tuple[int, int]]] = [[] for _ in range(num_ranks)]
    for r in range(num_ranks):
        for s in range(num_ranks):
            for t, row in enumerate(is_token_in_rank[s].tolist()):
                if row[r]:
                    order[r].append((s, t))
    return order


def _stack_rows(rows: list[torch.Tensor], num_rows: int, like: torch.Tensor) -> torch.Tensor:
    """Rows into a fresh contiguous tensor of `num_rows` rows shaped like `like`'s rows; missing rows zero."""
    out = torch.zeros((num_rows, *like.shape[1:]), dtype=like.dtype)
    for i, row in enumerate(rows):
        out[i] = row
    return out


def _route_x(x: list[RecvX], order: list[list[tuple[int, int]]], num_worst_tokens: int) -> list[RecvX]:
    """Move the rows of `x` (tensors, or `(x_q, scales)` pairs that travel together) along `order`."""
    num_ranks = len(order)
    if len(x) != num_ranks:
        raise ValueError(f"x has {len(x)} entries for {num_ranks} ranks")
    out: list[RecvX] = []
    for r in range(num_ranks):
        num_rows = num_worst_tokens if num_worst_tokens > 0 else len(order[r])
        if isinstance(x[0], tuple):
            x_q = _stack_rows([x[s][0][t] for s, t in order[r]], num_rows, x[0][0])
            scales = _stack_rows([x[s][1][t] for s, t in order[r]], num_rows, x[0][1])
            out.append((x_q, scales))
        else:
            out.append(_stack_rows([x[s][t] for s, t in order[r]], num_rows, x[0]))
    return out


def _check_x(x: list[RecvX], is_token_in_rank: list[torch.Tensor]) -> None:
    tuple_input = isinstance(x[0], tuple)
    for s, xs in enumerate(x):
        if isinstance(xs, tuple) != tuple_input:
            raise ValueError(f"x[{s}] is {'not ' if tuple_input else ''}a tuple unlike x[0]")
        parts = xs if isinstance(xs, tuple) else (xs,)
        firsts = x[0] if isinstance(x[0], tuple) else (x[0],)
        for part, first in zip(parts, firsts, strict=True):
            if part.shape[0] != is_token_in_rank[s].shape[0]:
                raise ValueError(
                    f"x[{s}] has {part.shape[0]} rows but is_token_in_rank[{s}] has {is_token_in_rank[s].shape[0]}"
                )
            if part.shape[1:] != first.shape[1:] or part.dtype != first.dtype:
                raise ValueError(
                    f"x[{s}] is {part.dtype} {tuple(part.shape)}, x[0] is {first.dtype} {tuple(first.shape)}"
                )


def _check_worst(num_worst_tokens: int, order: list[list[tuple[int, int]]]) -> None:
    for r, rows in enumerate(order):
        if 0 < num_worst_tokens < len(rows):
            raise ValueError(f"num_worst_tokens={num_worst_tokens} < num_recv={len(rows)} on rank {r}")


def dispatch(
    x: list[RecvX],
    is_token_in_rank: list[torch.Tensor],
    num_tokens_per_expert: list[torch.Tensor],
    topk_idx: list[torch.Tensor] | None = None,
    topk_weights: list[torch.Tensor] | None = None,
    num_experts: int | None = None,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
    num_channels: int = 10,
) -> list[dict]:
    """SPEC 4 (normal `dispatch`, non-cached) on every rank, with DeepEP's intranode handle items.

    `x[s]`: `[N_s, H]` of any dtype, or `(x_q [N_s, H], scales [N_s] or [N_s, S])`;
    `is_token_in_rank[s]`: bool `[N_s, R]`; `num_tokens_per_expert[s]`: int32 `[E]`;
    `topk_idx[s]` / `topk_weights[s]`: `[N_s, K]` or both None; `num_channels`: `C = num_sms // 2`.

    Returns per rank a dict: `recv_x`, `recv_topk_idx`, `recv_topk_weights`,
    `num_recv_tokens_per_expert_list` and the handle items `rank_prefix_matrix` (int32 `[R, R]`),
    `channel_prefix_matrix` (int32 `[R, C]`), `recv_channel_prefix_matrix` (int32 `[R, C]`),
    `recv_src_idx` (int32), `is_token_in_rank` (this rank's, bool `[N, R]`), `send_head` (int32 `[N, R]`).
    """
    num_ranks = len(x)
    if len(is_token_in_rank) != num_ranks or len(num_tokens_per_expert) != num_ranks:
        raise ValueError("x, is_token_in_rank and num_tokens_per_expert need one entry per rank")
    if (topk_idx is None) != (topk_weights is None):
        raise ValueError("topk_idx and topk_weights are given together or not at all")
    if num_experts is None:
        num_experts = num_tokens_per_expert[0].numel()
    experts_per_rank = _check_experts(num_experts, num_ranks)
    for s, counts in enumerate(num_tokens_per_expert):
        if counts.shape != (num_experts,):
            raise ValueError(f"num_tokens_per_expert[{s}] must be [{num_experts}], got {tuple(counts.shape)}")
    if expert_alignment < 1:
        raise ValueError(f"expert_alignment={expert_alignment} must be >= 1")
    if num_channels < 1:
        raise ValueError(f"num_channels={num_channels} must be >= 1")
    if num_worst_tokens < 0:
        raise ValueError(f"num_worst_tokens={num_worst_tokens} must be >= 0")
    _check_routing(is_token_in_rank)
    _check_x(x, is_token_in_rank)
    if topk_idx is not None and topk_weights is not None:
        for s in range(num_ranks):
            _check_topk_idx(topk_idx[s], num_experts, s)
            num_tokens = is_token_in_rank[s].shape[0]
            if topk_idx[s].shape[0] != num_tokens or topk_weights[s].shape != topk_idx[s].shape:
                raise ValueError(
                    f"topk_idx[{s}] {tuple(topk_idx[s].shape)} and topk_weights[{s}] {tuple(topk_weights[s].shape)}"
                    f" must both be [N={num_tokens}, K]"
                )

    order = _receive_order(is_token_in_rank)
    _check_worst(num_worst_tokens, order)
    recv_x = _route_x(x, order, num_worst_tokens)
    sent = [m.tolist() for m in is_token_in_rank]  # sent[s][t][d]

    # rank_prefix_matrix[i][j]: tokens sent to j by ranks 0..i (identical on every rank).
    rank_prefix = [[0] * num_ranks for _ in range(num_ranks)]
    for i in range(num_ranks):
        for j in range(num_ranks):
            above = rank_prefix[i - 1][j] if i > 0 else 0
            rank_prefix[i][j] = above + sum(row[j] for row in sent[i])

    # tokens_in_channel[s][d][c]: tokens of sender s in channel c's range that go to d.
    tokens_in_channel = [[[0] * num_channels for _ in range(num_ranks)] for _ in range(num_ranks)]
    send_head = []
    for s in range(num_ranks):
        num_tokens = len(sent[s])
        head = [[-1] * num_ranks for _ in range(num_tokens)]
        for c in range(num_channels):
            start, end = channel_range(c, num_tokens, num_channels)
            for t in range(start, end):
                for d in range(num_ranks):
                    if sent[s][t][d]:
                        head[t][d] = tokens_in_channel[s][d][c]  # position restarts at 0 in every channel
                        tokens_in_channel[s][d][c] += 1
        send_head.append(torch.tensor(head, dtype=torch.int32).reshape(num_tokens, num_ranks))

    results = []
    for r in range(num_ranks):
        num_recv = len(order[r])
        num_rows = num_worst_tokens if num_worst_tokens > 0 else num_recv

        # Sender side: inclusive prefix over channels of r's own tokens per (destination, channel).
        channel_prefix = [[0] * num_channels for _ in range(num_ranks)]
        for d in range(num_ranks):
            running = 0
            for c in range(num_channels):
                running += tokens_in_channel[r][d][c]
                channel_prefix[d][c] = running

        # Receiver side (DeepEP's meaning): where source s's channel c starts within source s's block of rows,
        # i.e. an exclusive prefix over s's channels that restarts at 0 for every source; the block itself
        # starts at row rank_prefix[s - 1][r].
        recv_channel_prefix = [[0] * num_channels for _ in range(num_ranks)]
        for s in range(num_ranks):
            row = 0
            for c in range(num_channels):
                recv_channel_prefix[s][c] = row
                row += tokens_in_channel[s][r][c]

        src_idx = [t for _, t in order[r]] + [-1] * (num_rows - num_recv)

        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None and topk_weights is not None:
            idx_rows, weight_rows = [], []
            for s, t in order[r]:
                local_idx, local_weights = [], []
                for e, w in zip(topk_idx[s][t].tolist(), topk_weights[s][t].tolist(), strict=True):
                    is_local = e >= 0 and e // experts_per_rank == r
                    local_idx.append(e - r * experts_per_rank if is_local else -1)
                    local_weights.append(w if is_local else 0.0)  # w is a float32 value: exact round trip
                idx_rows.append(local_idx)
                weight_rows.append(local_weights)
            num_topk = topk_idx[0].shape[1]
            idx_rows += [[-1] * num_topk] * (num_rows - num_recv)
            weight_rows += [[0.0] * num_topk] * (num_rows - num_recv)
            recv_topk_idx = torch.tensor(idx_rows, dtype=topk_idx[0].dtype).reshape(num_rows, num_topk)
            recv_topk_weights = torch.tensor(weight_rows, dtype=torch.float32).reshape(num_rows, num_topk)

        count_list: list[int] = []
        if num_worst_tokens == 0:
            for i in range(experts_per_rank):
                total = sum(int(num_tokens_per_expert[s][r * experts_per_rank + i]) for s in range(num_ranks))
                count_list.append(_align_up(total, expert_alignment))

        results.append(
            {
                "recv_x": recv_x[r],
                "recv_topk_idx": recv_topk_idx,
                "recv_topk_weights": recv_topk_weights,
                "num_recv_tokens_per_expert_list": count_list,
                "rank_prefix_matrix": torch.tensor(rank_prefix, dtype=torch.int32),
                "channel_prefix_matrix": torch.tensor(channel_prefix, dtype=torch.int32),
                "recv_channel_prefix_matrix": torch.tensor(recv_channel_prefix, dtype=torch.int32),
                "recv_src_idx": torch.tensor(src_idx, dtype=torch.int32),
                "is_token_in_rank": is_token_in_rank[r].clone(),
                "send_head": send_head[r],
            }
        )
    return results


def cached_dispatch(x: list[RecvX], is_token_in_rank: list[torch.Tensor], num_worst_tokens: int = 0) -> list[RecvX]:
    """SPEC 4 cached mode: route `x` (same `N_s` per rank, any dtype) exactly as the dispatch that made the handle.

    `is_token_in_rank[s]` is rank `s`'s handle item. Returns per rank `recv_x` (a tensor, or a tuple when `x`
    holds tuples), padded with zero rows to `num_worst_tokens` when that is positive.
    """
    if len(x) != len(is_token_in_rank):
        raise ValueError(f"x has {len(x)} entries, is_token_in_rank {len(is_token_in_rank)}")
    if num_worst_tokens < 0:
        raise ValueError(f"num_worst_tokens={num_worst_tokens} must be >= 0")
    _check_routing(is_token_in_rank)
    _check_x(x, is_token_in_rank)
    order = _receive_order(is_token_in_rank)
    _check_worst(num_worst_tokens, order)
    return _route_x(x, order, num_worst_tokens)


_COMBINE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _bias_terms(bias: Bias) -> list[torch.Tensor]:
    """The biases in summation order; a pair may leave either place empty, as DeepEP's `(bias_0, bias_1)` may."""
    if bias is None:
        return []
    if isinstance(bias, tuple):
        return [b for b in bias if b is not None]
    return [bias]


def combine(
    x: list[torch.Tensor],
    is_token_in_rank: list[torch.Tensor],
    topk_weights: list[torch.Tensor] | None = None,
    bias: list[Bias] | None = None,
) -> list[dict]:
    """SPEC 5 (normal `combine`) on every rank.

    `x[d]`: rank `d`'s rows `[>= num_recv_d, H]` (bf16, fp16 or fp32) in its dispatch receive order; rows past
    `num_recv_d` are padding and never read. `is_token_in_rank[s]`: rank `s`'s handle item (bool `[N_s, R]`).
    `topk_weights[d]`: fp32 `[>= num_recv_d, K]` or None. `bias[s]`: None, `[N_s, H]`, or a pair of those
    (either may be None).

    Returns per rank `combined_x` (`[N_s, H]`, x's dtype: fp32 sum of bias_0, bias_1, then the rows from
    destination ranks ascending, one rounding) and `combined_topk_weights` (fp32 `[N_s, K]` or None: fp32
    sum over destination ranks ascending).
    """
    num_ranks = len(x)
    if len(is_token_in_rank) != num_ranks:
        raise ValueError(f"x has {num_ranks} entries, is_token_in_rank {len(is_token_in_rank)}")
    if topk_weights is not None and len(topk_weights) != num_ranks:
        raise ValueError(f"topk_weights has {len(topk_weights)} entries for {num_ranks} ranks")
    if bias is not None and len(bias) != num_ranks:
        raise ValueError(f"bias has {len(bias)} entries for {num_ranks} ranks")
    dtype = x[0].dtype
    if dtype not in _COMBINE_DTYPES:
        raise ValueError(f"combine takes bf16, fp16 or fp32 x, got {dtype}")
    hidden = x[0].shape[1]

    order = _receive_order(is_token_in_rank)
    for d in range(num_ranks):
        if x[d].dtype != dtype or x[d].dim() != 2 or x[d].shape[1] != hidden or x[d].shape[0] < len(order[d]):
            raise ValueError(
                f"x[{d}] must be {dtype} [>= {len(order[d])}, {hidden}], got {x[d].dtype} {tuple(x[d].shape)}"
            )
        if topk_weights is not None and topk_weights[d].shape[0] < len(order[d]):
            raise ValueError(f"topk_weights[{d}] has {topk_weights[d].shape[0]} rows, needs {len(order[d])}")

    # row_of[d][(s, t)]: the row of rank d's x that holds source s's token t.
    row_of = [{src: i for i, src in enumerate(order[d])} for d in range(num_ranks)]

    results = []
    for s in range(num_ranks):
        num_tokens = is_token_in_rank[s].shape[0]
        biases = _bias_terms(bias[s] if bias is not None else None)
        for b in biases:
            if b.shape != (num_tokens, hidden) or b.dtype != dtype:
                raise ValueError(
                    f"bias of rank {s} must be {dtype} [{num_tokens}, {hidden}], got {b.dtype} {tuple(b.shape)}"
                )
        sent = is_token_in_rank[s].tolist()

        combined_x = torch.zeros((num_tokens, hidden), dtype=dtype)
        combined_w = None
        if topk_weights is not None:
            combined_w = torch.zeros((num_tokens, topk_weights[0].shape[1]), dtype=torch.float32)
        for t in range(num_tokens):
            dests = [d for d in range(num_ranks) if sent[t][d]]  # ascending rank order
            # Separate fp32 tensor additions: each element is rounded after every add (no reassociation).
            acc = torch.zeros(hidden, dtype=torch.float32)  # +0.0
            for b in biases:
                acc = acc + b[t].float()
            for d in dests:
                acc = acc + x[d][row_of[d][(s, t)]].float()
            combined_x[t] = acc.to(dtype)  # the one rounding
            if combined_w is not None and topk_weights is not None:
                w_acc = torch.zeros(combined_w.shape[1], dtype=torch.float32)
                for d in dests:
                    w_acc = w_acc + topk_weights[d][row_of[d][(s, t)]].float()
                combined_w[t] = w_acc
        results.append({"combined_x": combined_x, "combined_topk_weights": combined_w})
    return results
