"""Low-latency dispatch and combine (SPEC section 6) for all ranks at once.

Every function takes a list indexed by rank and returns a list indexed by rank. Unused receive rows (at or
past `recv_count`) are zero everywhere, `src_info` included (0, not -1), which the SPEC allows since
comparisons ignore them.
"""

from __future__ import annotations

import torch

from .casts import FP8_BLOCK, UE8M0_PACK, fp8_cast, int8_cast

__all__ = ["low_latency_combine", "low_latency_dispatch"]

_QUANT_FORMATS = ("fp8", "int8")


def _check_inputs(
    x: list[torch.Tensor] | None, topk_idx: list[torch.Tensor], num_max_dispatch_tokens_per_rank: int, num_experts: int
) -> int:
    """Shared argument checks; returns `L`, the number of local experts."""
    num_ranks = len(topk_idx)
    if num_ranks < 1:
        raise ValueError("at least one rank is needed")
    if num_experts <= 0 or num_experts % num_ranks != 0:
        raise ValueError(f"num_experts={num_experts} is not a positive multiple of num_ranks={num_ranks}")
    for s, idx in enumerate(topk_idx):
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"topk_idx[{s}] must be int64/int32 [N, K], got {idx.dtype} {tuple(idx.shape)}")
        if idx.shape[0] > num_max_dispatch_tokens_per_rank:
            raise ValueError(
                f"rank {s} has N={idx.shape[0]} tokens > num_max_dispatch_tokens_per_rank="
                f"{num_max_dispatch_tokens_per_rank}"
            )
        bad = (idx < -1) | (idx >= num_experts)
        if bool(bad.any()):
            raise ValueError(f"topk_idx[{s}] holds expert id {int(idx[bad][0])} outside [-1, {num_experts})")
        # docs/SEMANTICS.md: a token's experts are distinct (a repeat could overflow an expert's R*T rows).
        for t, row in enumerate(idx.tolist()):
            chosen = [e for e in row if e >= 0]
            if len(set(chosen)) != len(chosen):
                raise ValueError(f"topk_idx[{s}][{t}] = {row} selects an expert twice")
    if x is not None:
        if len(x) != num_ranks:
            raise ValueError(f"x has {len(x)} entries, topk_idx {num_ranks}")
        for s, xs in enumerate(x):
            if xs.dim() != 2 or xs.dtype != torch.bfloat16 or xs.shape[0] != topk_idx[s].shape[0]:
                raise ValueError(f"x[{s}] must be bf16 [N={topk_idx[s].shape[0]}, H], got {xs.dtype} {tuple(xs.shape)}")
            if xs.shape[1] != x[0].shape[1]:
                raise ValueError(f"hidden differs across ranks: x[{s}] has {xs.shape[1]}, x[0] has {x[0].shape[1]}")
    return num_experts // num_ranks


def _expert_rows(topk_idx: list[torch.Tensor], experts_per_rank: int) -> list[list[list[tuple[int, int, int]]]]:
    """SPEC 6 row order: `rows[d][i]` lists the `(source rank, t, k)` of each row of rank d's local expert i.

    One row per `(t, k)` with a valid expert; walking s, then t, then k in ascending order and appending
    gives exactly "source rank ascending, then t ascending, then k ascending" in every expert's list.
    """
    num_ranks = len(topk_idx)
    rows: list[list[list[tuple[int, int, int]]]] = [[[] for _ in range(experts_per_rank)] for _ in range(num_ranks)]
    for s in range(num_ranks):
        for t, row in enumerate(topk_idx[s].tolist()):
            for k, e in enumerate(row):
                if e >= 0:
                    rows[e // experts_per_rank][e % experts_per_rank].append((s, t, k))
    return rows


def low_latency_dispatch(
    x: list[torch.Tensor],
    topk_idx: list[torch.Tensor],
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    use_fp8: bool = True,
    quant: str = "fp8",
    round_scale: bool = False,
    use_ue8m0: bool = False,
) -> list[dict]:
    """SPEC 6 (`low_latency_dispatch`, with the casts of 6.1 / 6.2) on every rank.

    `x[s]`: bf16 `[N_s, H]`, `N_s <= T`; `topk_idx[s]`: `[N_s, K]` with `-1` allowed. `quant` picks the
    wire format of `use_fp8=True` (`"fp8"` or `"int8"`).

    Returns per rank a dict: `recv_x` (bf16 `[L, R*T, H]`; fp8: `(float8_e4m3fn [L, R*T, H], scales)` with
    float32 `[L, R*T, H//128]` or, with `use_ue8m0`, int32 `[L, R*T, H//512]` scales, both with strides
    `(R*T*S, 1, R*T)`; int8: `(int8 [L, R*T, H], float32 [L, R*T])`), `recv_count` (int32 `[L]`),
    `src_info` (int32 `[L, R*T]`) and `layout_range` (int64 `[L, R]`, `(begin << 32) | count`).
    """
    experts_per_rank = _check_inputs(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts)
    if quant not in _QUANT_FORMATS:
        raise ValueError(f"quant={quant!r} is not one of {_QUANT_FORMATS}")
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True requires round_scale=True")
    if use_fp8 and quant != "fp8" and round_scale:
        # SPEC 6.1 defines rounded and ue8m0 scales for fp8 only: refuse them for int8, as deep_ep.Buffer does
        # (docs/SEMANTICS.md). Without use_fp8 there are no scales, and DeepEP ignores both flags.
        raise ValueError(f"round_scale/use_ue8m0 apply only to the fp8 format (quant={quant!r})")
    num_ranks = len(x)
    hidden = x[0].shape[1]
    num_rows = num_ranks * num_max_dispatch_tokens_per_rank  # R*T rows per local expert
    if use_fp8 and quant == "fp8":
        block = FP8_BLOCK * UE8M0_PACK if use_ue8m0 else FP8_BLOCK
        if hidden % block != 0:
            raise ValueError(f"hidden={hidden} is not a multiple of {block} (fp8, use_ue8m0={use_ue8m0})")

    # Each token is quantised once on its source rank; every copy of it carries the same bytes.
    sent: list[tuple[torch.Tensor, ...]] = []
    for xs in x:
        if not use_fp8:
            sent.append((xs,))
        elif quant == "fp8":
            sent.append(fp8_cast(xs, round_scale=round_scale, use_ue8m0=use_ue8m0))
        else:
            sent.append(int8_cast(xs))

    rows = _expert_rows(topk_idx, experts_per_rank)
    results = []
    for d in range(num_ranks):
        shape = (experts_per_rank, num_rows, hidden)
        if not use_fp8:
            recv_parts: tuple[torch.Tensor, ...] = (torch.zeros(shape, dtype=torch.bfloat16),)
        elif quant == "fp8":
            num_scales = hidden // (FP8_BLOCK * UE8M0_PACK) if use_ue8m0 else hidden // FP8_BLOCK
            scale_dtype = torch.int32 if use_ue8m0 else torch.float32
            # Allocated as [L, S, R*T] and viewed as [L, R*T, S]: DeepEP's column-major scale layout.
            scales = torch.zeros((experts_per_rank, num_scales, num_rows), dtype=scale_dtype).transpose(1, 2)
            recv_parts = (torch.zeros(shape, dtype=torch.float8_e4m3fn), scales)
        else:
            recv_parts = (
                torch.zeros(shape, dtype=torch.int8),
                torch.zeros((experts_per_rank, num_rows), dtype=torch.float32),
            )
        recv_count = torch.zeros(experts_per_rank, dtype=torch.int32)
        src_info = torch.zeros((experts_per_rank, num_rows), dtype=torch.int32)
        layout_range = torch.zeros((experts_per_rank, num_ranks), dtype=torch.int64)

        for i in range(experts_per_rank):
            for j, (s, t, _k) in enumerate(rows[d][i]):
                for part, source_part in zip(recv_parts, sent[s], strict=True):
                    part[i, j] = source_part[t]
                src_info[i, j] = t
            recv_count[i] = len(rows[d][i])
            begin = 0
            for s in range(num_ranks):
                count = sum(1 for src, _t, _k in rows[d][i] if src == s)
                layout_range[i, s] = (begin << 32) | count
                begin += count

        results.append(
            {
                "recv_x": recv_parts[0] if len(recv_parts) == 1 else recv_parts,
                "recv_count": recv_count,
                "src_info": src_info,
                "layout_range": layout_range,
            }
        )
    return results


def low_latency_combine(
    x: list[torch.Tensor],
    topk_idx: list[torch.Tensor],
    topk_weights: list[torch.Tensor],
    num_max_dispatch_tokens_per_rank: int,
) -> list[torch.Tensor]:
    """SPEC 6.3 (`low_latency_combine`) on every rank.

    `x[d]`: bf16 `[L, R*T, H]`, rank d's expert outputs in its dispatch row order; `topk_idx[s]` /
    `topk_weights[s]`: the `[N_s, K]` tensors rank s dispatched with. Returns per rank bf16 `[N_s, H]`:
    `combined[t]` = bf16 of the fp32 sum, from +0.0 over k ascending with a valid expert, of
    `fp32(w[t, k]) * fp32(row)`, each product rounded before it is added.
    """
    num_ranks = len(topk_idx)
    if len(x) != num_ranks or len(topk_weights) != num_ranks:
        raise ValueError("x, topk_idx and topk_weights need one entry per rank")
    experts_per_rank, _, hidden = x[0].shape
    num_experts = experts_per_rank * num_ranks
    _check_inputs(None, topk_idx, num_max_dispatch_tokens_per_rank, num_experts)
    for d, xd in enumerate(x):
        if xd.dtype != torch.bfloat16 or tuple(xd.shape) != (
            experts_per_rank,
            num_ranks * num_max_dispatch_tokens_per_rank,
            hidden,
        ):
            raise ValueError(
                f"x[{d}] must be bf16 [L={experts_per_rank}, R*T={num_ranks * num_max_dispatch_tokens_per_rank}, "
                f"H={hidden}], got {xd.dtype} {tuple(xd.shape)}"
            )
    for s in range(num_ranks):
        if topk_weights[s].shape != topk_idx[s].shape:
            raise ValueError(f"topk_weights[{s}] {tuple(topk_weights[s].shape)} != topk_idx {tuple(topk_idx[s].shape)}")

    rows = _expert_rows(topk_idx, experts_per_rank)
    # row_of[(s, t, k)] = (d, i, j): where rank d keeps the copy of s's token t sent for its k-th expert.
    row_of = {}
    for d in range(num_ranks):
        for i in range(experts_per_rank):
            for j, src in enumerate(rows[d][i]):
                row_of[src] = (d, i, j)

    results = []
    for s in range(num_ranks):
        num_tokens, num_topk = topk_idx[s].shape
        out = torch.zeros((num_tokens, hidden), dtype=torch.bfloat16)
        weights = topk_weights[s].float()
        for t in range(num_tokens):
            acc = torch.zeros(hidden, dtype=torch.float32)  # +0.0
            for k in range(num_topk):
                if int(topk_idx[s][t, k]) < 0:
                    continue
                d, i, j = row_of[(s, t, k)]
                # Two separate fp32 tensor ops: the product is rounded before the add (no FMA).
                product = x[d][i, j].float() * weights[t, k]
                acc = acc + product
            out[t] = acc.to(torch.bfloat16)
        results.append(out)
    return results
