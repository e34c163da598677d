"""Seeded workloads: every rank builds every rank's inputs from one generator, so each rank can compute
the expected result of the whole world locally (and a failure names inputs anyone can rebuild).

Routing families (`routing=`):
- "uniform": K distinct experts per token, uniformly;
- "skewed": a few hot experts take most selections;
- "group_limited": each token's experts lie on at most `max(1, R // 2)` ranks;
- "sparse": about 60% of the entries are -1, and some tokens select nothing;
- "idle_rank": no token selects an expert of the last rank (it receives nothing).
`make_workload` also takes a `-1` density (`invalid_fraction`) and a hot-expert boost (`skew`) that
apply on top of any routing (property-based tests draw them).

Workload families (`make_family`, used by the differential harness `deep_ep.testing.diff`) add shapes to
the routings: "empty_rank" (one rank has no tokens, N = 0), "max_tokens" (N = T on every rank),
"small_hidden" and "large_hidden" (H = 7168, behind an option: it is slow on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROUTINGS = ("uniform", "skewed", "group_limited", "sparse", "idle_rank")
# Families: the routings, plus shape families (uniform routing) that vary N, T or H.
FAMILIES = (*ROUTINGS, "empty_rank", "max_tokens", "small_hidden", "large_hidden")
LARGE_FAMILIES = ("large_hidden",)
LARGE_HIDDEN = 7168  # DeepSeek-V3's hidden size


@dataclass
class Workload:
    """All ranks' inputs: x[s] [N_s, H], topk_idx[s] int64 [N_s, K], topk_weights[s] float32 [N_s, K]."""

    num_experts: int
    hidden: int
    num_topk: int
    x: list[torch.Tensor]
    topk_idx: list[torch.Tensor]
    topk_weights: list[torch.Tensor]
    family: str = ""
    max_tokens: int = 0  # T (num_max_dispatch_tokens_per_rank) for low-latency mode; 0 = max N

    @property
    def num_ranks(self) -> int:
        return len(self.x)


def _route(
    gen: torch.Generator,
    num_tokens: int,
    num_experts: int,
    num_ranks: int,
    num_topk: int,
    routing: str,
    invalid_fraction: float = 0.0,
    skew: float = 0.0,
) -> torch.Tensor:
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if skew > 0:  # drawn only when asked for, so the default streams of the routings stay as they were
        hot = torch.randperm(num_experts, generator=gen)[: max(1, num_experts // 8)]
        scores[:, hot] += skew
    experts_per_rank = num_experts // num_ranks
    rank_of = torch.arange(num_experts) // experts_per_rank
    if routing == "skewed":
        hot = torch.randperm(num_experts, generator=gen)[: max(1, num_experts // 8)]
        scores[:, hot] += 0.75
    elif routing == "group_limited":
        groups = max(1, num_ranks // 2)
        for t in range(num_tokens):
            allowed = torch.randperm(num_ranks, generator=gen)[:groups]
            scores[t, ~torch.isin(rank_of, allowed)] -= 2.0
    elif routing == "idle_rank" and num_ranks > 1:
        scores[:, rank_of == num_ranks - 1] = -1.0
    elif routing not in ("uniform", "sparse", "idle_rank"):
        raise ValueError(f"unknown routing {routing!r}; known: {ROUTINGS}")
    topk_idx = scores.topk(num_topk, dim=1).indices
    if routing == "idle_rank" and num_ranks > 1:
        topk_idx = torch.where(rank_of[topk_idx] == num_ranks - 1, -1, topk_idx)
    if routing == "group_limited":
        topk_idx = torch.where(scores.gather(1, topk_idx) < 0, -1, topk_idx)
    if routing == "sparse":
        topk_idx = torch.where(torch.rand(topk_idx.shape, generator=gen) < 0.6, -1, topk_idx)
        if num_tokens:
            topk_idx[:: max(1, num_tokens // 3)] = -1  # some tokens select nothing at all
    if invalid_fraction > 0:
        topk_idx = torch.where(torch.rand(topk_idx.shape, generator=gen) < invalid_fraction, -1, topk_idx)
    # Standard strides: torch.where can give an empty [0, 1] result the strides (1, 0).
    return topk_idx.long().clone(memory_format=torch.contiguous_format)


def make_workload(
    num_ranks: int,
    num_tokens: int | list[int],
    hidden: int,
    num_topk: int,
    num_experts: int,
    *,
    seed: int = 0,
    routing: str = "uniform",
    dtype: torch.dtype = torch.bfloat16,
    self_describing: bool = False,
    invalid_fraction: float = 0.0,
    skew: float = 0.0,
    weights_on_invalid: bool = False,
    signed_weights: bool = False,
) -> Workload:
    """Every rank's inputs. `num_tokens` may differ per rank (a list). With `self_describing`, x[s][t] is
    the source rank in every column but the last, which holds t (DeepEP's test_intranode style).

    `invalid_fraction`: each entry becomes -1 with this probability (after the routing's own rule);
    `skew`: score boost of E/8 hot experts; `weights_on_invalid`: keep a nonzero weight where the index is
    -1 (combine must skip those entries rather than rely on a zero weight); `signed_weights`: each weight
    negative with probability 1/2, |w| in [0.1, 1.1) (a combine that drops the sign must show)."""
    if num_topk > num_experts:
        raise ValueError(f"num_topk={num_topk} > num_experts={num_experts}")
    gen = torch.Generator().manual_seed(seed)
    counts = num_tokens if isinstance(num_tokens, list) else [num_tokens] * num_ranks
    xs, idxs, weights = [], [], []
    for rank, n in enumerate(counts):
        if self_describing:
            x = torch.full((n, hidden), float(rank), dtype=torch.float32)
            x[:, -1] = torch.arange(n, dtype=torch.float32)
        else:
            x = torch.randn(n, hidden, generator=gen)
        xs.append(x.to(dtype))
        topk_idx = _route(gen, n, num_experts, num_ranks, num_topk, routing, invalid_fraction, skew)
        w = torch.rand(n, num_topk, generator=gen) + 0.1
        if signed_weights:  # drawn only when asked for: the other callers' streams stay as they were
            w = torch.where(torch.rand(n, num_topk, generator=gen) < 0.5, -w, w)
        weights.append(w if weights_on_invalid else torch.where(topk_idx >= 0, w, torch.zeros_like(w)))
        idxs.append(topk_idx)
    return Workload(num_experts, hidden, num_topk, xs, idxs, weights)


def family_tokens(family: str, num_ranks: int, num_tokens: int, max_tokens: int, seed: int = 0) -> list[int]:
    """Tokens per rank of a family: N everywhere, N = T for "max_tokens", one rank with 0 for "empty_rank"."""
    if family == "max_tokens":
        return [max_tokens] * num_ranks
    counts = [num_tokens] * num_ranks
    if family == "empty_rank":
        counts[seed % num_ranks] = 0
    return counts


def family_hidden(family: str, hidden: int, small_hidden: int, large_hidden: int = LARGE_HIDDEN) -> int:
    """Hidden size of a family: `small_hidden` / `large_hidden` for those families, else `hidden`."""
    return {"small_hidden": small_hidden, "large_hidden": large_hidden}.get(family, hidden)


def make_family(
    family: str,
    num_ranks: int,
    *,
    num_tokens: int,
    hidden: int,
    num_topk: int,
    num_experts: int,
    max_tokens: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    small_hidden: int = 16,
    large_hidden: int = LARGE_HIDDEN,
    invalid_fraction: float = 0.0,
    skew: float = 0.0,
) -> Workload:
    """Every rank's inputs for one workload family (see the module docstring and `FAMILIES`).

    `num_tokens` is N per rank, `max_tokens` T (default N; "max_tokens" uses N = T). Weights are signed
    (|w| >= 0.1) and nonzero where the index is -1, so a combine that drops the sign or forgets to skip those
    entries shows.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown workload family {family!r}; known: {FAMILIES}")
    tokens_cap = num_tokens if max_tokens is None else max_tokens
    if num_tokens > tokens_cap:
        raise ValueError(f"num_tokens={num_tokens} > max_tokens={tokens_cap}")
    w = make_workload(
        num_ranks,
        family_tokens(family, num_ranks, num_tokens, tokens_cap, seed),
        family_hidden(family, hidden, small_hidden, large_hidden),
        num_topk,
        num_experts,
        seed=seed,
        routing=family if family in ROUTINGS else "uniform",
        dtype=dtype,
        invalid_fraction=invalid_fraction,
        skew=skew,
        weights_on_invalid=True,
        signed_weights=True,
    )
    w.family, w.max_tokens = family, tokens_cap
    return w
