"""Seeded workloads: every rank builds every rank's inputs from one generator, so each rank can compute
the expected result of the whole world locally (and a failure names inputs anyone can rebuild).

Routing families (`routing=`):
- "uniform": K distinct experts per token, uniformly;
- "skewed": a few hot experts take most selections;
- "group_limited": each token's experts lie on at most `max(1, R // 2)` ranks;
- "sparse": about 60% of the entries are -1, and some tokens select nothing;
- "idle_rank": no token selects an expert of the last rank (it receives nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROUTINGS = ("uniform", "skewed", "group_limited", "sparse", "idle_rank")


@dataclass
class Workload:
    """All ranks' inputs: x[s] [N_s, H], topk_idx[s] int64 [N_s, K], topk_weights[s] float32 [N_s, K]."""

    num_experts: int
    hidden: int
    num_topk: int
    x: list[torch.Tensor]
    topk_idx: list[torch.Tensor]
    topk_weights: list[torch.Tensor]

    @property
    def num_ranks(self) -> int:
        return len(self.x)


def _route(
    gen: torch.Generator, num_tokens: int, num_experts: int, num_ranks: int, num_topk: int, routing: str
) -> torch.Tensor:
    scores = torch.rand(num_tokens, num_experts, generator=gen)
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
    return topk_idx.long()


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
) -> Workload:
    """Every rank's inputs. `num_tokens` may differ per rank (a list). With `self_describing`, x[s][t] is
    the source rank in every column but the last, which holds t (DeepEP's test_intranode style)."""
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
        topk_idx = _route(gen, n, num_experts, num_ranks, num_topk, routing)
        w = torch.rand(n, num_topk, generator=gen) + 0.1
        weights.append(torch.where(topk_idx >= 0, w, torch.zeros_like(w)))
        idxs.append(topk_idx)
    return Workload(num_experts, hidden, num_topk, xs, idxs, weights)
