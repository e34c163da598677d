"""A reference expert-parallel MoE layer: the way to use deep_ep for training, end to end.

`MoELayer` = softmax top-k router -> `deep_ep.autograd.dispatch` -> `deep_ep.permute.permute` (rows grouped
by local expert) -> one MLP per local expert with batched weights -> `deep_ep.permute.unpermute` (top-k
weights applied, summed per received row) -> `deep_ep.autograd.combine` (summed over ranks). Gradients
reach the input, the router and the experts.

Weights come from `init_moe_weights(seed)`, identical in every process, so a test or a demo can compute
the same model densely in one process (`dense_moe`) and compare. Rank `r` of a group of `R` holds experts
`[r*L, (r+1)*L)` with `L = E // R`; the router is replicated: each rank's router gradient covers its own
tokens only, and data-parallel gradient reduction (over the EP group too) sums them as usual.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import autograd as ep_autograd
from . import checks
from .buffer import Buffer
from .permute import permute, unpermute

__all__ = ["MoELayer", "MoEWeights", "dense_moe", "expert_mlp", "init_moe_weights", "moe_forward", "route"]

Activation = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MoEWeights:
    """All experts' weights: router [E, H], w1 [E, H, F], w2 [E, F, H] (one dtype)."""

    router: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor

    def to(self, dtype: torch.dtype) -> MoEWeights:
        return MoEWeights(self.router.to(dtype), self.w1.to(dtype), self.w2.to(dtype))


def init_moe_weights(
    hidden: int, ffn_hidden: int, num_experts: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> MoEWeights:
    """Seeded weights of a whole layer, identical in every process (drawn in float32 on the CPU, then cast).

    Scaled normal: router and w1 by 1/sqrt(hidden), w2 by 1/sqrt(ffn_hidden).
    """
    gen = torch.Generator().manual_seed(seed)
    router = torch.randn(num_experts, hidden, generator=gen) / math.sqrt(hidden)
    w1 = torch.randn(num_experts, hidden, ffn_hidden, generator=gen) / math.sqrt(hidden)
    w2 = torch.randn(num_experts, ffn_hidden, hidden, generator=gen) / math.sqrt(ffn_hidden)
    return MoEWeights(router, w1, w2).to(dtype)


def route(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, *, normalize_topk: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing.

    Arguments:
        x: [N, H]; router_weight: [E, H] of x's dtype.
    Returns:
        topk_idx int64 [N, K] (highest score first) and topk_weights [N, K]: the softmax scores in float32
        (float64 when x is float64), renormalised to sum 1 with `normalize_topk`.
    """
    top_k = checks.integer("top_k", top_k, minimum=1)
    if top_k > router_weight.shape[0]:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={router_weight.shape[0]}]")
    logits = F.linear(x, router_weight)
    scores = torch.softmax(logits.to(_score_dtype(x)), dim=-1)
    weights, idx = scores.topk(top_k, dim=-1)
    if normalize_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    return idx, weights


def _score_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, activation: Activation = F.silu) -> torch.Tensor:
    """One expert: activation(x @ w1) @ w2. x [M, H], w1 [H, F], w2 [F, H] -> [M, H]."""
    return activation(x @ w1) @ w2


def moe_forward(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    buffer: Buffer,
    top_k: int,
    *,
    activation: Activation = F.silu,
    expert_alignment: int = 1,
    normalize_topk: bool = False,
) -> torch.Tensor:
    """The expert-parallel MoE forward on this rank, differentiable in every tensor argument.

    Arguments:
        x: [N, H] (bf16, fp16, fp32; fp64 with the reference backend), this rank's tokens.
        router_weight: [E, H], the same on every rank. w1: [L, H, F], w2: [L, F, H]: this rank's experts
            (global experts [rank*L, (rank+1)*L)).
        buffer: the EP group's Buffer; top_k: K; expert_alignment: rows per expert group padded to a multiple.
    Returns:
        y [N, H] of x's dtype: y[t] = sum_k w[t, k] * expert_{e_k}(x[t]); per rank the local experts' terms
        are summed in fp32 in k order (unpermute), then ranks ascending in fp32 (combine).
    Errors: a bad argument (each is checked, naming it) or an exception from the router or the experts on one
    rank fails the call on every rank (the peers raise CollectiveMismatchError), and the Buffer stays usable.
    """
    if not isinstance(buffer, Buffer):
        raise TypeError(f"buffer must be a deep_ep.Buffer, got {type(buffer).__name__}")
    # An error on this rank alone (a bad argument, or one raised by route or the experts) still takes part in
    # the agreement of the call it precedes, so the peers raise in their dispatch (combine) too instead of
    # pairing it with this rank's next call.
    with ep_autograd._rejected_as(buffer, "dispatch"):
        num_local = _num_local_experts(x, router_weight, w1, w2, buffer.group_size)
        topk_idx, topk_weights = route(x, router_weight, top_k, normalize_topk=normalize_topk)
    num_experts = num_local * buffer.group_size
    sent = ep_autograd.dispatch(buffer, x, topk_idx, topk_weights, num_experts, expert_alignment=expert_alignment)
    with ep_autograd._rejected_as(buffer, "combine"):
        counts = sent.num_recv_tokens_per_expert_list
        grouped = permute(
            sent.recv_x,
            sent.recv_topk_idx,
            num_local,
            expert_alignment=expert_alignment,
            num_tokens_per_expert=counts,
        )
        outputs, start = [], 0
        for e, count in enumerate(counts):  # host ints from dispatch: no sync; a grouped GEMM on a GPU
            outputs.append(expert_mlp(grouped.permuted_x[start : start + count], w1[e], w2[e], activation))
            start += count
        expert_out = torch.cat(outputs) if outputs else grouped.permuted_x
        per_row = unpermute(expert_out, grouped.handle, sent.recv_topk_weights)
    return ep_autograd.combine(buffer, per_row, sent.handle).combined_x


def _num_local_experts(
    x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, num_ranks: int
) -> int:
    """L, once x [N, H], router_weight [L * num_ranks, H], w1 [L, H, F] and w2 [L, F, H] fit together."""
    checks.tensor("x", x, dim=2)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    hidden = x.shape[1]
    num_local, w1_hidden, ffn = checks.tensor("w1", w1, dim=3).shape
    if w1_hidden != hidden:
        raise ValueError(f"w1 {list(w1.shape)} must be [L, H, F] with H = {hidden}, the hidden size of x")
    if checks.tensor("w2", w2, dim=3).shape != (num_local, ffn, hidden):
        raise ValueError(f"w2 {list(w2.shape)} must be [L, F, H] = {[num_local, ffn, hidden]} (w1 is [L, H, F])")
    num_experts, router_hidden = checks.tensor("router_weight", router_weight, dim=2).shape
    if num_experts != num_local * num_ranks:
        raise ValueError(
            f"router_weight has {num_experts} experts but w1 holds {num_local} per rank for "
            f"{num_ranks} ranks ({num_local * num_ranks} experts)"
        )
    if router_hidden != hidden:
        raise ValueError(f"router_weight {list(router_weight.shape)} must be [E, H] with H = {hidden}, as x")
    return num_local


def dense_moe(
    xs: torch.Tensor | Sequence[torch.Tensor],
    weights: MoEWeights,
    top_k: int,
    *,
    activation: Activation = F.silu,
    normalize_topk: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """The same layer in one process, no communication: the oracle for `MoELayer`.

    Arguments:
        xs: [N, H], or every rank's tokens as a list (each routed on its own, as its rank does, so the
            router matmuls have the same shapes); weights: all experts' (`init_moe_weights`).
    Returns:
        y like xs: y[t] = sum over k ascending of fp32(w[t, k]) * fp32(expert_{e_k}(x[t])) from +0.0 (fp64
        for fp64 x), one rounding. Each expert sees its tokens in (rank, token) order, the order
        dispatch delivers them, so the expert matmuls match the expert-parallel ones row for row.
    """
    chunks = [xs] if isinstance(xs, torch.Tensor) else list(xs)
    routed = [route(x, weights.router, top_k, normalize_topk=normalize_topk) for x in chunks]
    x = torch.cat(chunks)
    topk_idx = torch.cat([r[0] for r in routed])
    topk_weights = torch.cat([r[1] for r in routed])
    acc_dtype = torch.float64 if torch.float64 in (x.dtype, topk_weights.dtype) else torch.float32
    num_tokens = x.shape[0]
    terms = x.new_zeros(num_tokens, top_k, x.shape[1])
    for e in range(weights.w1.shape[0]):
        token, k = (topk_idx == e).nonzero(as_tuple=True)  # token ascending
        if token.numel():
            terms = terms.index_put((token, k), expert_mlp(x[token], weights.w1[e], weights.w2[e], activation))
    acc = x.new_zeros(num_tokens, x.shape[1], dtype=acc_dtype)
    for k in range(top_k):
        acc = acc + topk_weights[:, k : k + 1].to(acc_dtype) * terms[:, k].to(acc_dtype)
    y = acc.to(x.dtype)
    if isinstance(xs, torch.Tensor):
        return y
    return list(y.split([c.shape[0] for c in chunks]))


class MoELayer(nn.Module):
    """Expert-parallel MoE layer over a deep_ep Buffer (the reference way to use the library).

    Arguments:
        hidden: H; ffn_hidden: F (each expert is activation(x @ w1) @ w2); num_experts: E (divisible by the
            group size); top_k: K.
        group: the EP process group (default: the world), ignored when `buffer` is given.
        buffer: a `deep_ep.Buffer` to share between layers (default: a new one on `group`).
        dtype: of parameters and activations. seed: `init_moe_weights` seed, the same on every rank.
        activation, expert_alignment, normalize_topk: see `moe_forward` and `route`.
    Parameters: router [E, H] (replicated), w1 [L, H, F] and w2 [L, F, H] (this rank's experts).
    forward(x [N, H]) -> [N, H]; every rank of the group must call it (and backward) together.
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        num_experts: int,
        top_k: int,
        group: dist.ProcessGroup | None = None,
        buffer: Buffer | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        activation: Activation = F.silu,
        expert_alignment: int = 1,
        normalize_topk: bool = False,
    ) -> None:
        super().__init__()
        if buffer is None:
            buffer = Buffer(group if group is not None else dist.group.WORLD)
        if not isinstance(buffer, Buffer):
            raise TypeError(f"buffer must be a deep_ep.Buffer, got {type(buffer).__name__}")
        # Checked, then agreed on by every rank: a rank that rejects its arguments, or ranks built with different
        # sizes, fail here on every rank instead of leaving the others to wait in the first forward.
        with buffer._collective("moe_layer") as agree:
            hidden, ffn_hidden, num_experts, top_k, expert_alignment = (
                checks.integer(name, value, minimum=1)
                for name, value in (
                    ("hidden", hidden),
                    ("ffn_hidden", ffn_hidden),
                    ("num_experts", num_experts),
                    ("top_k", top_k),
                    ("expert_alignment", expert_alignment),
                )
            )
            seed = checks.integer("seed", seed)
            if num_experts % buffer.group_size:
                raise ValueError(f"num_experts={num_experts} is not divisible by num_ranks={buffer.group_size}")
            if top_k > num_experts:
                raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
            agree(
                "moe_layer",
                hidden=hidden,
                ffn_hidden=ffn_hidden,
                num_experts=num_experts,
                top_k=top_k,
                expert_alignment=expert_alignment,
                seed=seed,
            )
        self.buffer = buffer
        self.hidden, self.ffn_hidden, self.num_experts, self.top_k = hidden, ffn_hidden, num_experts, top_k
        self.num_local_experts = num_experts // buffer.group_size
        self.seed, self.activation = seed, activation
        self.expert_alignment, self.normalize_topk = expert_alignment, normalize_topk
        full = init_moe_weights(hidden, ffn_hidden, num_experts, seed=seed, dtype=dtype)
        local = self.local_experts
        device = buffer.device
        self.router = nn.Parameter(full.router.to(device))
        self.w1 = nn.Parameter(full.w1[local.start : local.stop].clone().to(device))
        self.w2 = nn.Parameter(full.w2[local.start : local.stop].clone().to(device))

    @property
    def local_experts(self) -> range:
        """The global expert ids this rank holds."""
        first = self.buffer.rank * self.num_local_experts
        return range(first, first + self.num_local_experts)

    def full_weights(self) -> MoEWeights:
        """Every expert's initial weights (from the seed), for a dense reference of this layer."""
        return init_moe_weights(self.hidden, self.ffn_hidden, self.num_experts, seed=self.seed, dtype=self.router.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moe_forward(
            x,
            self.router,
            self.w1,
            self.w2,
            self.buffer,
            self.top_k,
            activation=self.activation,
            expert_alignment=self.expert_alignment,
            normalize_topk=self.normalize_topk,
        )

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, local_experts=[{self.local_experts.start}, {self.local_experts.stop})"
        )
