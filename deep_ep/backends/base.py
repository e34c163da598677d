"""The interface between the `Buffer` façade and a backend.

The façade validates arguments, checks that ranks agree, and turns a backend's `Pending` into an
`EventOverlap`; a backend only moves data. Inputs reaching a backend are already validated, except the checks
that read device data: a dispatch's count exchange carries them (`DispatchArgs.expert_id_range`), so they cost no
host round trip of their own and every rank raises together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from .. import checks
from ..comm import Comm, Pending


@dataclass
class DispatchArgs:
    """A normal-mode dispatch, validated. x: [N, H] any dtype; x_scales: [N, S] or [N] or None."""

    x: torch.Tensor
    x_scales: torch.Tensor | None
    num_tokens_per_rank: torch.Tensor  # int32 [R]
    is_token_in_rank: torch.Tensor  # bool [N, R]
    num_tokens_per_expert: torch.Tensor  # int32 [E]
    topk_idx: torch.Tensor | None  # int64/int32 [N, K]
    topk_weights: torch.Tensor | None  # float32 [N, K]
    expert_alignment: int
    num_worst_tokens: int
    num_channels: int

    def expert_id_range(self) -> torch.Tensor:
        """int32 [2] on the device: the smallest and largest of the expert ids in topk_idx and -1 (the "none" id:
        so [-1, -1] without ids), clamped to [-2, E]. All that is read of it is whether an id lies outside
        [-1, E). A backend appends it to its count exchange, so the id check costs no round trip of its own, and
        calls `raise_on_bad_input` with every rank's flags before any row moves."""
        if self.topk_idx is None or self.topk_idx.numel() == 0:
            return torch.full((2,), -1, dtype=torch.int32, device=self.x.device)
        low, high = torch.aminmax(self.topk_idx)
        return torch.stack([low.clamp(-2, -1), high.clamp(-1, self.num_tokens_per_expert.numel())]).int()

    def raise_on_bad_input(self, flags: list[tuple[bool, bool]], rank: int) -> None:
        """Raise, on every rank, if any rank's flags (entry r: rank r's (invalid expert id, layout that does not
        describe is_token_in_rank)) are set: the rank at fault names its argument, the others name that rank.
        Nothing has moved yet, so the Buffer stays usable."""
        ids_bad, layout_bad = flags[rank]
        if ids_bad:
            checks.expert_ids("topk_idx", self.topk_idx, self.num_tokens_per_expert.numel())  # names the entry
        if layout_bad:
            raise ValueError(
                f"num_tokens_per_rank={self.num_tokens_per_rank.tolist()} does not match is_token_in_rank, which "
                f"sends {self.is_token_in_rank.sum(0).tolist()} tokens per rank"
            )
        at_fault = [r for r, row in enumerate(flags) if any(row)]
        if at_fault:
            raise ValueError(
                f"dispatch: rank(s) {at_fault} passed an invalid topk_idx or a layout that does not match "
                "is_token_in_rank (their errors say which); every rank raises, so none waits in a collective"
            )


@dataclass
class LowLatencyDispatchArgs:
    """A low-latency dispatch, validated. x: bf16 [N, H], N <= T; topk_idx: int64 [N, K]."""

    x: torch.Tensor
    topk_idx: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    use_fp8: bool
    quant: str  # "fp8" or "int8": the wire format when use_fp8
    round_scale: bool
    use_ue8m0: bool


class Backend:
    """A way to move tokens. Subclasses set `name`, `device_types`, `priority` and implement the ops.

    `unavailable_reason` must be cheap and never raise: it is asked for every registered backend
    when `backend="auto"` picks one (highest `priority` among the available ones wins).
    """

    name: ClassVar[str] = ""
    device_types: ClassVar[tuple[str, ...]] = ()
    priority: ClassVar[int] = 0
    features: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, comm: Comm, device: torch.device, low_latency_quant: str) -> None:
        self.comm = comm
        self.device = device
        self.low_latency_quant = low_latency_quant
        # `Config.num_sms` of the normal-mode call in progress (the Buffer sets it): the SM budget of a
        # backend's kernels, where it has any.
        self.num_sms = 20

    @classmethod
    def unavailable_reason(cls, group: dist.ProcessGroup, device: torch.device) -> str | None:
        """None when this backend can serve `group` with tensors on `device`; otherwise why not."""
        raise NotImplementedError

    @classmethod
    def supports(cls, feature: str) -> bool:
        """Capability query, e.g. "low_latency", "normal", "int8", "fp8"."""
        return feature in cls.features

    @classmethod
    def native_low_latency_quant(cls) -> str:
        """The wire format that `use_fp8=True` selects when the Buffer does not name one."""
        return "fp8"

    def max_hidden_error(self, hidden: int, mode: str) -> str | None:
        """Why this backend cannot serve `hidden` in `mode` ("normal"/"low_latency"), or None."""
        return None

    # Normal mode (SPEC sections 3-5).
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> tuple:
        raise NotImplementedError

    def dispatch(self, args: DispatchArgs) -> tuple[dict, object, Pending]:
        """Returns (outputs, route, pending): outputs are filled once `pending.wait()` ran."""
        raise NotImplementedError

    def cached_dispatch(
        self, x: torch.Tensor, x_scales: torch.Tensor | None, route: object
    ) -> tuple[torch.Tensor, torch.Tensor | None, Pending]:
        raise NotImplementedError

    def combine(
        self,
        x: torch.Tensor,
        route: object,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor | None, Pending]:
        raise NotImplementedError

    # Low-latency mode (SPEC section 6).
    def low_latency_dispatch(self, args: LowLatencyDispatchArgs) -> tuple[dict, object, Pending]:
        raise NotImplementedError

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        route: object,
        out: torch.Tensor,
    ) -> Pending:
        raise NotImplementedError
