"""Differential harness (SPEC section 9): the same seeded workloads through several participants, compared.

A *participant* is a registered backend on a device and process group (`reference@cpu`, `ascend@npu`,
`reference@cuda/gloo` = the reference backend moving CUDA tensors over a gloo group), or the executable
spec (`spec`, the single-process functions of `reference/`). Inside one multi-rank run every rank builds
every rank's inputs from the case's seed, runs each participant's op chain, moves the outputs to the CPU,
and compares every participant with the first one (the *oracle*) by the rules of SPEC section 9:

- "spec9" (default): bit for bit, except int8 low-latency dispatch (quantised values within 1, scales
  within 1 float32 ulp, `recv_count` / `layout_range` / `src_info` equal) and the low-latency combine after
  an int8 dispatch (`|out - ref| <= sum_k |w_k| * scale_t / 2 + 1 bf16 ulp of |ref|`, `scale_t` = the int8
  scale of token t's row); normal dispatch compares handle items 0 and 3 only.
- "exact": every output bit for bit, all six handle items included (the reference backend vs the spec).

Low-latency rows: only rows below the oracle's `recv_count` are compared (the rest are unspecified). Where
either side of a comparison declares the feature `"unordered_ll_rows"` (or is written `name:any-order`), rows
are compared after sorting each expert's rows by (source rank, `src_info`), the source rank of a row being
read from that side's own `layout_range`; `layout_range` is then compared by counts. Backends without the
feature claim the SPEC 6 order and are compared in place.

The op chain of a normal-mode case: `get_dispatch_layout` -> `dispatch` -> `combine` (expert outputs and
weights derived from what arrived, plus 0-2 biases) -> `cached_dispatch` (a gradient) -> `combine_backward`
-> `cached_dispatch_x` (x in its own format again) -> `dispatch_no_topk` -> `dispatch_worst` (with
`num_worst_tokens`) -> `cached_dispatch_worst` -> `combine_worst` (`NORMAL_OPS`).
A low-latency case: `low_latency_dispatch` -> `low_latency_combine`. Each participant chains its own
outputs, as a user would; expert outputs are computed on the CPU from the received rows' contents (not
their positions), so any row order that is a correct one gives the same combine result.

Each backend participant runs on a process group of its own; after every case the ranks exchange each
participant's status, and one that failed on any rank gets a fresh group (a failure on some ranks only
costs its peers `Plan.comm_timeout` seconds, not the run). The spec of a case is computed on one rank and
scattered, ranks taking turns. docs/HARNESS.md has the whole story.

Entry points: `make_cases` / `Plan`, `run_local` (a fresh world through `run_ranks`), `run_rank` (inside
an initialised process group, e.g. under torchrun) + `Report`, whose `result` is PASS, FAIL, or NOT RUN where
a participant was compared in no case (skipped everywhere, or an empty plan). `tools/crosscheck.py` is the
command line.
"""

from __future__ import annotations

import ctypes
import datetime
import importlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from .workloads import FAMILIES, LARGE_FAMILIES, LARGE_HIDDEN, Workload, make_family

MODES = ("normal", "low_latency")
DTYPES = ("bf16", "fp8", "int8")
# Low-latency wire formats: (use_fp8, low_latency_quant, round_scale, use_ue8m0). "fp8_round"/"fp8_ue8m0" are
# extra low-latency variants; in normal mode "fp8"/"int8" mean a (values, scales) tuple that travels unchanged.
LL_FORMATS = {
    "bf16": (False, None, False, False),  # no wire format: the Buffer keeps the backend's native one
    "fp8": (True, "fp8", False, False),
    "fp8_round": (True, "fp8", True, False),
    "fp8_ue8m0": (True, "fp8", True, True),
    "int8": (True, "int8", False, False),
}
RULES = ("spec9", "exact")
NORMAL_OPS = (
    "get_dispatch_layout",
    "dispatch",
    "combine",
    "cached_dispatch",  # a bf16 gradient, with the handle of `dispatch`
    "combine_backward",
    "cached_dispatch_x",  # x again, in the case's own format (scales included), with the handle of `dispatch`
    "dispatch_no_topk",  # no topk_idx / topk_weights
    "dispatch_worst",  # num_worst_tokens = R * T: every receive padded to that many rows
    "cached_dispatch_worst",  # x with the handle of `dispatch_worst`
    "combine_worst",  # with the handle of `dispatch_worst`, the padding rows NaN
)
LOW_LATENCY_OPS = ("low_latency_dispatch", "low_latency_combine")
OPS = NORMAL_OPS + LOW_LATENCY_OPS
_DISPATCH_OPS = ("dispatch", "dispatch_no_topk", "dispatch_worst")
_WORST_OPS = ("dispatch_worst", "cached_dispatch_worst")
_UNSPECIFIED_TAILS = ("recv_x", "recv_x_scales", "recv_topk_weights", "recv_src_idx")  # SPEC 4, num_worst_tokens
UNORDERED_FEATURE = "unordered_ll_rows"
EXIT_STATUS = {"PASS": 0, "FAIL": 1, "NOT RUN": 3}  # 2 is argparse's usage error
# SPEC 9 compares handle items 0 (rank_prefix_matrix) and 3 (recv_src_idx) only, not these:
_OTHER_HANDLE_ITEMS = ("channel_prefix_matrix", "recv_channel_prefix_matrix", "is_token_in_rank", "send_head")


# ---------------------------------------------------------------------------------------------------------
# What runs: participants, cases, the plan.
# ---------------------------------------------------------------------------------------------------------
_GROUP_DEVICE = {"nccl": "cuda", "hccl": "npu", "xccl": "xpu"}


@dataclass(frozen=True)
class Participant:
    """One way of computing the outputs: a registered backend on a device and group, or the executable spec.

    kind: "backend" or "spec". name: the registered backend name. device: "cpu", "cuda", "npu", ...;
    None = the group's natural device. group: "world" (the run's process group) or a torch.distributed
    backend name ("gloo", "nccl", ...) for a second group made with `dist.new_group(backend=group)`.
    row_order: "spec" (claims SPEC 6 row order), "any" (compare low-latency rows in canonical order),
    or None = ask the backend (`supports("unordered_ll_rows")`).
    """

    kind: str = "backend"
    name: str = "reference"
    device: str | None = None
    group: str = "world"
    row_order: str | None = None

    @staticmethod
    def parse(text: str) -> Participant:
        """`spec`, or `NAME[@DEVICE][/GROUP][:any-order|:spec-order]`, e.g. `reference@cuda/gloo`."""
        text = text.strip()
        if text == "spec":
            return Participant(kind="spec", name="spec", device="cpu", group="world")
        row_order = None
        if ":" in text:
            text, _, suffix = text.partition(":")
            if suffix not in ("any-order", "spec-order"):
                raise ValueError(f"participant suffix must be ':any-order' or ':spec-order', got {suffix!r}")
            row_order = suffix.split("-")[0]
        text, _, group = text.partition("/")
        name, _, device = text.partition("@")
        if not name:
            raise ValueError(f"participant {text!r} names no backend")
        return Participant("backend", name, device or None, group or "world", row_order)

    def resolve(self, world_backend: str) -> Participant:
        """The same participant with its device filled in for a world on `world_backend`."""
        if self.kind == "spec" or self.device is not None:
            return self
        backend = world_backend if self.group == "world" else self.group
        return replace(self, device=_GROUP_DEVICE.get(backend, "cpu"))

    @property
    def label(self) -> str:
        if self.kind == "spec":
            return "spec"
        text = f"{self.name}@{self.device or 'auto'}"
        if self.group != "world":
            text += f"/{self.group}"
        return text + (f":{self.row_order}-order" if self.row_order else "")


@dataclass(frozen=True)
class Case:
    """One seeded workload and op chain. `hidden` is the family's hidden size (already resolved)."""

    mode: str
    dtype: str
    family: str
    num_tokens: int
    max_tokens: int
    hidden: int
    num_topk: int
    experts_per_rank: int
    seed: int
    bias: int = 2
    expert_alignment: int = 1
    invalid_fraction: float = 0.0
    skew: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES or self.dtype not in LL_FORMATS or self.family not in FAMILIES:
            raise ValueError(f"case {self.mode}/{self.dtype}/{self.family}: unknown mode, dtype or family")
        if not 0 <= self.num_tokens <= self.max_tokens:
            raise ValueError(f"case needs 0 <= num_tokens={self.num_tokens} <= max_tokens={self.max_tokens}")

    @property
    def id(self) -> str:
        extra = ""
        if self.invalid_fraction or self.skew:
            extra = f" p(-1)={self.invalid_fraction:.2f} skew={self.skew:.2f}"
        return (
            f"{self.mode}/{self.dtype}/{self.family} N={self.num_tokens} T={self.max_tokens} H={self.hidden} "
            f"K={self.num_topk} L={self.experts_per_rank} seed={self.seed}{extra}"
        )

    def workload(self, num_ranks: int) -> Workload:
        return make_family(
            self.family,
            num_ranks,
            num_tokens=self.num_tokens,
            hidden=self.hidden,
            num_topk=self.num_topk,
            num_experts=self.experts_per_rank * num_ranks,
            max_tokens=self.max_tokens,
            seed=self.seed,
            small_hidden=self.hidden,
            large_hidden=self.hidden,
            invalid_fraction=self.invalid_fraction,
            skew=self.skew,
        )


def _hidden_block(mode: str, dtype: str) -> int:
    if mode == "low_latency" and dtype.startswith("fp8"):
        return 512 if dtype == "fp8_ue8m0" else 128
    return 1


def make_cases(
    num_ranks: int,
    *,
    families: Sequence[str] = (),
    modes: Sequence[str] = MODES,
    dtypes: Sequence[str] = DTYPES,
    num_tokens: int = 16,
    max_tokens: int | None = None,
    hidden: int = 128,
    small_hidden: int = 16,
    large_hidden: int = LARGE_HIDDEN,
    num_topk: int = 4,
    experts_per_rank: int = 4,
    seed: int = 0,
    repeats: int = 1,
    large: bool = False,
) -> list[Case]:
    """Every (family, mode, dtype) combination, `repeats` seeds each. `families` empty = all families
    (`large_hidden` only with `large=True`). `max_tokens` (T, default 1.5 N) must be at least `num_tokens`.
    Hidden sizes are rounded up to what a format needs (fp8 in low-latency mode: a multiple of 128, 512 with
    ue8m0); top-k is capped at the number of experts."""
    families = list(families) or [f for f in FAMILIES if large or f not in LARGE_FAMILIES]
    for name, allowed, values in (
        ("family", FAMILIES, families),
        ("mode", MODES, modes),
        ("dtype", LL_FORMATS, dtypes),
    ):
        for value in values:
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(allowed)}")
    if max_tokens is not None and max_tokens < num_tokens:
        raise ValueError(f"max_tokens={max_tokens} < num_tokens={num_tokens}: T bounds the tokens per rank")
    tokens_cap = max_tokens if max_tokens is not None else num_tokens + num_tokens // 2
    cases = []
    index = 0
    for mode in modes:
        for dtype in dtypes:
            if mode == "normal" and dtype in ("fp8_round", "fp8_ue8m0"):
                continue  # the rounding flags exist in low-latency mode only
            for family in families:
                for _ in range(repeats):
                    size = {"small_hidden": small_hidden, "large_hidden": large_hidden}.get(family, hidden)
                    block = _hidden_block(mode, dtype)
                    size = max(block, -(-size // block) * block)
                    num_experts = experts_per_rank * num_ranks
                    cases.append(
                        Case(
                            mode=mode,
                            dtype=dtype,
                            family=family,
                            num_tokens=tokens_cap if family == "max_tokens" else num_tokens,
                            max_tokens=tokens_cap,
                            hidden=size,
                            num_topk=min(num_topk, num_experts),
                            experts_per_rank=experts_per_rank,
                            seed=seed + index,
                            bias=index % 3,
                            expert_alignment=1 if index % 2 == 0 else 4,
                        )
                    )
                    index += 1
    return cases


@dataclass
class Plan:
    """Participants (the first is the oracle), cases, and the comparison rules."""

    participants: list[Participant]
    cases: list[Case]
    world_backend: str = "gloo"
    rules: str = "spec9"
    max_records: int = 4  # failing elements recorded per (case, rank, op, tensor)
    progress: bool = False
    comm_timeout: float = 120.0

    def __post_init__(self) -> None:
        if len(self.participants) < 2:
            raise ValueError(f"a comparison needs two or more participants, got {len(self.participants)}")
        if self.rules not in RULES:
            raise ValueError(f"rules must be one of {RULES}, got {self.rules!r}")
        self.participants = [p.resolve(self.world_backend) for p in self.participants]
        labels = [p.label for p in self.participants]
        if len(set(labels)) != len(labels):
            raise ValueError(f"participants must differ: {labels}")

    @property
    def oracle(self) -> Participant:
        return self.participants[0]


# ---------------------------------------------------------------------------------------------------------
# Inputs and the (position-independent) expert functions every participant applies on the CPU.
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """All ranks' inputs of one case: the workload, normal-mode x (tensor or tuple), biases, gradients."""

    case: Case
    workload: Workload
    x: list[Any]
    bias: list[Any]
    grad: list[torch.Tensor]

    @property
    def num_ranks(self) -> int:
        return self.workload.num_ranks


def _gen(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = seed * 1_000_003 + part
    return torch.Generator().manual_seed(seed % (2**62))


def build_inputs(case: Case, num_ranks: int) -> Inputs:
    """Every rank's inputs of `case`, identical in every process."""
    w = case.workload(num_ranks)
    xs, biases, grads = [], [], []
    for rank, x in enumerate(w.x):
        n, h = x.shape
        if case.mode == "normal" and case.dtype.startswith("fp8"):
            num_scales = max(1, -(-h // 128))
            # DeepEP's layout: scales [N, S] column-major (non-contiguous); both travel unchanged.
            scales = torch.rand(num_scales, n, generator=_gen(case.seed, rank, 1)).t() + 0.01
            xs.append((x.float().clamp(-448, 448).to(torch.float8_e4m3fn), scales))
        elif case.mode == "normal" and case.dtype == "int8":
            q = (x.float() * 32).round().clamp(-127, 127).to(torch.int8)
            xs.append((q, torch.rand(n, generator=_gen(case.seed, rank, 2)) + 0.01))
        else:
            xs.append(x)
        b = [torch.randn(n, h, generator=_gen(case.seed, rank, 3 + i)).to(torch.bfloat16) for i in range(2)]
        biases.append(None if case.bias == 0 else (b[0] if case.bias == 1 else (b[0], b[1])))
        grads.append(torch.randn(n, h, generator=_gen(case.seed, rank, 5)).to(torch.bfloat16))
    return Inputs(case, w, xs, biases, grads)


def _split(x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (x[0], x[1]) if isinstance(x, tuple) else (x, None)


def dequantize_normal(recv_x: Any) -> torch.Tensor:
    """float32 [M, H] of a normal-mode receive: bf16, (fp8, scales [M, S]) per 128 columns, or (int8, [M])."""
    data, scales = _split(recv_x)
    if scales is None:
        return data.float()
    if scales.dim() == 1:
        return data.float() * scales.float().unsqueeze(1)
    column_scale = torch.arange(data.shape[1]) // 128
    return data.float() * scales.float()[:, column_scale]


def _unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64)
    exponent = (packed.long().unsqueeze(-1) >> shifts) & 0xFF
    return (exponent.flatten(-2) << 23).int().view(torch.float32)


def dequantize_low_latency(recv_x: Any) -> torch.Tensor:
    """float32 [L, R*T, H] from any SPEC 6 receive format."""
    data, scales = _split(recv_x)
    if scales is None:
        return data.float()
    if data.dtype == torch.int8:
        return data.float() * scales.float().unsqueeze(-1)
    if scales.dtype == torch.int32:
        scales = _unpack_ue8m0(scales)
    return (data.float().unflatten(-1, (-1, 128)) * scales.float().unsqueeze(-1)).flatten(-2)


def normal_expert_output(rank: int, recv_x: Any, recv_topk_weights: torch.Tensor) -> torch.Tensor:
    """bf16 [M, H]: each received row scaled by a rank factor plus the sum of its local weights."""
    weight_sum = torch.zeros(recv_topk_weights.shape[0])
    for k in range(recv_topk_weights.shape[1]):  # a fixed order: the value must not depend on the library
        weight_sum = weight_sum + recv_topk_weights[:, k]
    return (dequantize_normal(recv_x) * (1.0 + 0.5 * rank) + weight_sum.unsqueeze(1)).to(torch.bfloat16)


def normal_returned_weights(rank: int, recv_topk_weights: torch.Tensor) -> torch.Tensor:
    return recv_topk_weights * (1.0 + 0.25 * rank)


def normal_backward_inputs(
    rank: int, recv_grad: torch.Tensor, recv_x: Any, recv_topk_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of recv_x bf16 [M, H], grad of recv_topk_weights fp32 [M, K]) for combine as the backward.

    The weight gradient is nonzero where the expert is not local, with a per-rank constant that float32
    cannot hold exactly: the per-token sums over destinations then round, so their order shows. The constant's
    sign alternates with the rank, so that a combine that sums |w| shows here too.
    """
    grad_x = (recv_grad.float() * (0.5 + 0.125 * rank) - dequantize_normal(recv_x) * 0.25).to(torch.bfloat16)
    return grad_x, recv_topk_weights * 0.5 + (0.1 + 0.03 * rank) * (-1) ** rank


def num_worst_tokens(case: Case, num_ranks: int) -> int:
    """`num_worst_tokens` of the case's "dispatch_worst": R * T, as many rows as a rank can ever receive."""
    return max(1, case.max_tokens * num_ranks)


def num_received(w: Workload, rank: int) -> int:
    """Rows `rank` receives in a normal dispatch: every rank's tokens with an expert on it (SPEC 4)."""
    local = w.num_experts // w.num_ranks
    return sum(int(((idx >= 0) & (idx // local == rank)).any(1).sum()) for idx in w.topk_idx)


def worst_expert_inputs(
    rank: int, recv_x: Any, recv_topk_weights: torch.Tensor, num_recv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combine inputs of a `num_worst_tokens` receive: expert outputs and returned weights, with the
    padding rows (from `num_recv` on) NaN: SPEC 5 never reads them, and a combine that does shows."""
    y = normal_expert_output(rank, recv_x, recv_topk_weights)
    returned = normal_returned_weights(rank, recv_topk_weights)
    y[num_recv:] = float("nan")
    returned[num_recv:] = float("nan")
    return y, returned


def low_latency_expert_output(rank: int, recv_x: Any, recv_count: torch.Tensor) -> torch.Tensor:
    """bf16 [L, R*T, H]: the dequantised row times 2^-((rank*L + expert) % 3); rows past recv_count are NaN.

    Only powers of two at most 1 scale the rows, so the int8 quantisation error is never amplified; the NaN
    rows make a combine that reads an unused row visible.
    """
    deq = dequantize_low_latency(recv_x)
    experts, rows, _ = deq.shape
    exponent = (rank * experts + torch.arange(experts)) % 3
    y = (deq * torch.pow(2.0, -exponent.float()).view(experts, 1, 1)).to(torch.bfloat16)
    unused = torch.arange(rows).unsqueeze(0) >= recv_count.long().unsqueeze(1)
    return y.masked_fill(unused.unsqueeze(-1), float("nan"))


# ---------------------------------------------------------------------------------------------------------
# Running the participants.
# ---------------------------------------------------------------------------------------------------------
Outputs = dict[str, dict[str, Any]]


class Skip(Exception):
    """A participant cannot run a case (unsupported format, hidden size, ...); not a mismatch."""


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, tuple):
        return tuple(_cpu(v) for v in value)
    return value


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def spec_outputs(inputs: Inputs, num_channels: int) -> list[Outputs]:
    """Every rank's outputs of the case's op chain, by the executable spec (`reference/`)."""
    import reference  # the executable spec lives beside the package (repository root on sys.path)

    case, w, num_ranks = inputs.case, inputs.workload, inputs.num_ranks
    outs: list[Outputs] = [{} for _ in range(num_ranks)]
    if case.mode == "low_latency":
        use_fp8, quant, round_scale, use_ue8m0 = LL_FORMATS[case.dtype]
        sent = reference.low_latency_dispatch(
            w.x, w.topk_idx, w.max_tokens, w.num_experts, use_fp8, quant or "fp8", round_scale, use_ue8m0
        )
        ys = [low_latency_expert_output(r, o["recv_x"], o["recv_count"]) for r, o in enumerate(sent)]
        combined = reference.low_latency_combine(ys, w.topk_idx, w.topk_weights, w.max_tokens)
        for r, o in enumerate(sent):
            data, scales = _split(o["recv_x"])
            outs[r]["low_latency_dispatch"] = _ll_dispatch_outputs(
                data, scales, o["recv_count"], o["src_info"], o["layout_range"], (w.max_tokens, w.hidden, w.num_experts)
            )
            outs[r]["low_latency_combine"] = {"combined_x": combined[r]}
        return outs

    layouts = reference.layout(w.topk_idx, w.num_experts)
    in_rank = [lay["is_token_in_rank"] for lay in layouts]
    per_expert = [lay["num_tokens_per_expert"] for lay in layouts]

    def dispatch(topk: bool = True, num_worst: int = 0) -> list[dict]:
        return reference.dispatch(
            inputs.x,
            in_rank,
            per_expert,
            w.topk_idx if topk else None,
            w.topk_weights if topk else None,
            w.num_experts,
            expert_alignment=case.expert_alignment,
            num_worst_tokens=num_worst,
            num_channels=num_channels,
        )

    worst = num_worst_tokens(case, num_ranks)
    sent, plain, padded = dispatch(), dispatch(topk=False), dispatch(num_worst=worst)
    ys = [normal_expert_output(r, o["recv_x"], o["recv_topk_weights"]) for r, o in enumerate(sent)]
    returned = [normal_returned_weights(r, o["recv_topk_weights"]) for r, o in enumerate(sent)]
    combined = reference.combine(ys, in_rank, returned, inputs.bias)
    grads = reference.cached_dispatch(inputs.grad, in_rank)
    back_in = [normal_backward_inputs(r, grads[r], o["recv_x"], o["recv_topk_weights"]) for r, o in enumerate(sent)]
    back = reference.combine([b[0] for b in back_in], in_rank, [b[1] for b in back_in])
    again = reference.cached_dispatch(inputs.x, in_rank)
    again_padded = reference.cached_dispatch(inputs.x, in_rank, worst)
    worst_in = [
        worst_expert_inputs(r, o["recv_x"], o["recv_topk_weights"], num_received(w, r)) for r, o in enumerate(padded)
    ]
    combined_worst = reference.combine([y for y, _ in worst_in], in_rank, [v for _, v in worst_in], inputs.bias)
    for r in range(num_ranks):
        outs[r]["get_dispatch_layout"] = {k: layouts[r][k] for k in _LAYOUT_NAMES}
        outs[r]["dispatch"] = _spec_dispatch_outputs(sent[r])
        outs[r]["combine"] = dict(combined[r])
        outs[r]["cached_dispatch"] = {"recv_x": grads[r]}
        outs[r]["combine_backward"] = dict(back[r])
        outs[r]["cached_dispatch_x"] = _recv_outputs(again[r])
        outs[r]["dispatch_no_topk"] = _spec_dispatch_outputs(plain[r])
        outs[r]["dispatch_worst"] = _spec_dispatch_outputs(padded[r])
        outs[r]["cached_dispatch_worst"] = _recv_outputs(again_padded[r])
        outs[r]["combine_worst"] = dict(combined_worst[r])
    return outs


def _recv_outputs(recv_x: Any) -> dict[str, Any]:
    data, scales = _split(recv_x)
    return {"recv_x": data, "recv_x_scales": scales}


def _dispatch_outputs(
    recv_x: Any, recv_topk_idx: Any, recv_topk_weights: Any, counts: Any, handle: Sequence
) -> dict[str, Any]:
    return {
        **_recv_outputs(recv_x),
        "recv_topk_idx": recv_topk_idx,
        "recv_topk_weights": recv_topk_weights,
        "num_recv_tokens_per_expert_list": counts,
        **dict(zip(_HANDLE_NAMES, handle)),
    }


def _spec_dispatch_outputs(o: dict) -> dict[str, Any]:
    keys = ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert_list")
    return _dispatch_outputs(*(o[k] for k in keys), [o[k] for k in _HANDLE_NAMES])


def _dispatched(result: tuple) -> dict[str, Any]:
    """The comparable outputs of a participant's `Buffer.dispatch` result, on the CPU (the list stays a list)."""
    recv_x, recv_idx, recv_w, counts, handle, _ = result
    return _dispatch_outputs(_cpu(recv_x), _cpu(recv_idx), _cpu(recv_w), counts, _cpu(tuple(handle[:6])))


_LAYOUT_NAMES = ("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert", "is_token_in_rank")
_HANDLE_NAMES = (
    "rank_prefix_matrix",
    "channel_prefix_matrix",
    "recv_channel_prefix_matrix",
    "recv_src_idx",
    "is_token_in_rank",
    "send_head",
)


def _ll_dispatch_outputs(data, scales, recv_count, src_info, layout_range, sizes) -> dict[str, Any]:
    return {
        "recv_count": recv_count,
        "layout_range": layout_range,
        "handle_sizes": torch.tensor(list(sizes), dtype=torch.int64),
        "src_info": src_info,
        "recv_x": data,
        "recv_scales": scales,
        # SPEC 6: fp8 scales are column-major, strides (R*T*S, 1, R*T)
        "recv_scales_strides": None if scales is None else torch.tensor(scales.stride(), dtype=torch.int64),
    }


class _Progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self.tty = enabled and sys.stderr.isatty()

    def __call__(self, index: int, case: Case, status: str, seconds: float) -> None:
        if not self.enabled:
            return
        line = f"crosscheck [{index + 1:>{len(str(self.total))}}/{self.total}] {case.id}: {status} ({seconds:.2f} s)"
        if self.tty:
            end = "\n" if index + 1 == self.total else ""
            sys.stderr.write(f"\r\033[K{line}{end}")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


class _Rank:
    """One rank's state: process groups, buffers, devices."""

    def __init__(self, plan: Plan, rank: int, world: int) -> None:
        self.plan, self.rank, self.world = plan, rank, world
        self.world_backend = dist.get_backend()
        # Made in the same order on every rank (new_group is collective). Each backend participant gets a
        # group of its own: a participant that fails on some ranks only leaves its own group out of step.
        self.control = dist.group.WORLD if self.world_backend == "gloo" else dist.new_group(backend="gloo")
        self.groups: dict[str, Any] = {}
        for p in plan.participants:
            if p.kind == "backend":
                self.groups[p.label] = self._new_group(p)
        self.buffers: dict[tuple, Any] = {}

    def _new_group(self, p: Participant) -> Any:
        backend = self.world_backend if p.group == "world" else p.group
        return dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=self.plan.comm_timeout))

    def agree(self, p: Participant, status: dict) -> None:
        """After `p` ran a case (collective): if it failed on any rank, give it a fresh group and buffers."""
        mine = f"{status['status']}:{status.get('op', '')}"
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine, group=self.control)
        if any(s.startswith("error") for s in everyone):
            self.groups[p.label] = self._new_group(p)
            for key in [k for k in self.buffers if k[0] == p.label]:
                del self.buffers[key]

    def device(self, p: Participant) -> torch.device:
        if p.device in (None, "cpu"):
            return torch.device("cpu")
        module = getattr(torch, p.device, None)
        index = module.current_device() if module is not None and hasattr(module, "current_device") else 0
        return torch.device(p.device, index)

    def row_order(self, p: Participant) -> str:
        if p.kind == "spec":
            return "spec"
        if p.row_order is not None:
            return p.row_order
        from ..backends import get_backend_class

        return "any" if get_backend_class(p.name).supports(UNORDERED_FEATURE) else "spec"

    def buffer(self, p: Participant, case: Case) -> Any:
        from .. import Buffer, UnsupportedFeatureError
        from ..errors import BackendUnavailableError

        quant = LL_FORMATS[case.dtype][1] if case.mode == "low_latency" else None
        key = (p.label, case.mode, quant)
        if key not in self.buffers:
            nvl, rdma, qps = _buffer_sizes(self.plan.cases, case.mode, self.world)
            try:
                buffer = Buffer(
                    self.groups[p.label],
                    num_nvl_bytes=nvl,
                    num_rdma_bytes=rdma,
                    low_latency_mode=case.mode == "low_latency",
                    num_qps_per_rank=qps,
                    backend=p.name,
                    low_latency_quant=quant,
                )
                buffer.comm_timeout = self.plan.comm_timeout
            except (UnsupportedFeatureError, BackendUnavailableError) as error:
                buffer = Skip(f"{type(error).__name__}: {error}")
            self.buffers[key] = buffer
        buffer = self.buffers[key]
        if isinstance(buffer, Skip):
            raise buffer
        reason = buffer.runtime.max_hidden_error(case.hidden, case.mode)
        if reason:
            raise Skip(reason)
        return buffer

    def run(self, p: Participant, inputs: Inputs, state: dict) -> Outputs:
        """This rank's outputs of `p` (on the CPU); `state["op"]` names the op running (for error reports)."""
        from .. import Buffer

        case, w, rank = inputs.case, inputs.workload, self.rank
        outs: Outputs = {}
        buffer = self.buffer(p, case)
        device = self.device(p)
        idx, weights = w.topk_idx[rank].to(device), w.topk_weights[rank].to(device)
        if case.mode == "low_latency":
            use_fp8, _, round_scale, use_ue8m0 = LL_FORMATS[case.dtype]
            state["op"] = "low_latency_dispatch"
            recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
                w.x[rank].to(device),
                idx,
                w.max_tokens,
                w.num_experts,
                use_fp8=use_fp8,
                round_scale=round_scale,
                use_ue8m0=use_ue8m0,
            )
            recv_x, recv_count = _cpu(recv_x), _cpu(recv_count)
            data, scales = _split(recv_x)
            outs["low_latency_dispatch"] = _ll_dispatch_outputs(
                data, scales, recv_count, _cpu(handle[0]), _cpu(handle[1]), tuple(int(v) for v in handle[2:])
            )
            state["op"] = "low_latency_combine"
            y = low_latency_expert_output(rank, recv_x, recv_count).to(device)
            combined, _, _ = buffer.low_latency_combine(y, idx, weights, handle)
            outs["low_latency_combine"] = {"combined_x": _cpu(combined)}
            return outs

        state["op"] = "get_dispatch_layout"
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, w.num_experts)
        outs["get_dispatch_layout"] = dict(zip(_LAYOUT_NAMES, _cpu((per_rank, per_rdma, per_expert, in_rank))))
        config = Buffer.get_dispatch_config(self.world)
        x, bias = _to(inputs.x[rank], device), _to(inputs.bias[rank], device)

        def dispatch(**kwargs: Any) -> tuple:
            return buffer.dispatch(
                x,
                num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                expert_alignment=case.expert_alignment,
                config=config,
                **kwargs,
            )

        def cached(handle: tuple, value: Any) -> Any:
            return _cpu(buffer.dispatch(_to(value, device), handle=handle, config=config)[0])

        def combine(y: torch.Tensor, handle: tuple, weights: torch.Tensor, bias: Any = None) -> dict:
            combined, combined_w, _ = buffer.combine(
                y.to(device), handle, topk_weights=weights.to(device), bias=bias, config=config
            )
            return {"combined_x": _cpu(combined), "combined_topk_weights": _cpu(combined_w)}

        state["op"] = "dispatch"
        result = dispatch(topk_idx=idx, topk_weights=weights)
        handle, recv_x, recv_w = result[4], _cpu(result[0]), _cpu(result[2])
        outs["dispatch"] = _dispatched(result)
        state["op"] = "combine"
        y, returned = normal_expert_output(rank, recv_x, recv_w), normal_returned_weights(rank, recv_w)
        outs["combine"] = combine(y, handle, returned, bias)
        state["op"] = "cached_dispatch"
        recv_grad = cached(handle, inputs.grad[rank])
        outs["cached_dispatch"] = {"recv_x": recv_grad}
        state["op"] = "combine_backward"
        grad_x, grad_w = normal_backward_inputs(rank, recv_grad, recv_x, recv_w)
        outs["combine_backward"] = combine(grad_x, handle, grad_w)
        state["op"] = "cached_dispatch_x"
        outs["cached_dispatch_x"] = _recv_outputs(cached(handle, inputs.x[rank]))
        state["op"] = "dispatch_no_topk"
        outs["dispatch_no_topk"] = _dispatched(dispatch())
        state["op"] = "dispatch_worst"
        result = dispatch(topk_idx=idx, topk_weights=weights, num_worst_tokens=num_worst_tokens(case, self.world))
        handle, recv_x, recv_w = result[4], _cpu(result[0]), _cpu(result[2])
        outs["dispatch_worst"] = _dispatched(result)
        state["op"] = "cached_dispatch_worst"
        outs["cached_dispatch_worst"] = _recv_outputs(cached(handle, inputs.x[rank]))
        state["op"] = "combine_worst"
        y, returned = worst_expert_inputs(rank, recv_x, recv_w, num_received(w, rank))
        outs["combine_worst"] = combine(y, handle, returned, bias)
        return outs


def _buffer_sizes(cases: Sequence[Case], mode: str, world: int) -> tuple[int, int, int]:
    """(num_nvl_bytes, num_rdma_bytes, num_qps_per_rank) large enough for every case of `mode`."""
    from .. import Buffer

    nvl = rdma = 0
    qps = 1
    for case in cases:
        if case.mode != mode:
            continue
        if mode == "normal":
            for config in (Buffer.get_dispatch_config(world), Buffer.get_combine_config(world)):
                nvl = max(nvl, config.get_nvl_buffer_size_hint(case.hidden * 2, world))
                rdma = max(rdma, config.get_rdma_buffer_size_hint(case.hidden * 2, world))
        else:
            num_experts = case.experts_per_rank * world
            rdma = max(rdma, Buffer.get_low_latency_rdma_size_hint(case.max_tokens, case.hidden, world, num_experts))
            qps = max(qps, case.experts_per_rank)
    return nvl, rdma, qps


def load_setup(setup: Callable[[], Any] | str | None) -> None:
    """Run `setup`: a callable, or "module:function" ("module" alone calls its `setup`); None does nothing."""
    if setup is None:
        return
    if isinstance(setup, str):
        module_name, _, attr = setup.partition(":")
        setup = getattr(importlib.import_module(module_name), attr or "setup")
    setup()


def run_rank(rank: int, world: int, plan: Plan, setup: Callable[[], Any] | str | None = None) -> dict:
    """Run every case on this rank of an initialised process group; returns this rank's results.

    `setup` (a callable or "module:function") runs first, e.g. to register backends in this process.
    Rank 0 prints progress to stderr when `plan.progress` is set. Collective: call it on every rank.
    """
    load_setup(setup)
    ctx = _Rank(plan, rank, world)
    orders = {p.label: ctx.row_order(p) for p in plan.participants}
    progress = _Progress(plan.progress and rank == 0, len(plan.cases))
    channels = _channels(world)
    has_spec = any(p.kind == "spec" for p in plan.participants)
    cases = []
    last = time.perf_counter()
    for first in range(0, len(plan.cases), world):
        # The spec of a group of `world` cases: one case per rank, each sent out in slices (scatter).
        group = list(range(first, min(first + world, len(plan.cases))))
        specs = _sharded_spec(plan, group, rank, world, channels, ctx.control) if has_spec else {}
        for index in group:
            case = plan.cases[index]
            inputs = build_inputs(case, world)
            outputs, status = _run_participants(ctx, plan, inputs, specs.get(index))
            checks = []
            oracle = plan.oracle.label
            for p in plan.participants[1:]:
                if oracle in outputs and p.label in outputs:
                    found = compare_outputs(
                        inputs,
                        rank,
                        outputs[oracle],
                        outputs[p.label],
                        rules=plan.rules,
                        canonical="any" in (orders[p.label], orders[oracle]),  # either may be unordered
                        max_records=plan.max_records,
                    )
                    for c in found:
                        c.update(case_index=index, participant=p.label, oracle=oracle)
                    checks += found
            bad = any(not c["passed"] for c in checks) or any(s["status"] == "error" for s in status.values())
            flag = torch.tensor([int(bad)])
            dist.all_reduce(flag, group=ctx.control)
            now = time.perf_counter()
            seconds, last = now - last, now
            progress(index, case, "MISMATCH" if int(flag) else "ok", seconds)
            cases.append({"index": index, "status": status, "checks": checks, "seconds": seconds})
    return {"rank": rank, "world": world, "row_order": orders, "cases": cases}


def _run_participants(ctx: _Rank, plan: Plan, inputs: Inputs, spec: Any) -> tuple[dict, dict]:
    """This rank's outputs of every participant that ran, and each participant's status."""
    outputs: dict[str, Outputs] = {}
    status: dict[str, dict] = {}
    for p in plan.participants:
        state = {"op": "setup"}
        try:
            if p.kind == "spec":
                if isinstance(spec, str):
                    raise RuntimeError(f"the executable spec raised on its rank:\n{spec}")
                outputs[p.label] = spec
            else:
                outputs[p.label] = ctx.run(p, inputs, state)
            status[p.label] = {"status": "ok"}
        except Skip as reason:
            status[p.label] = {"status": "skipped", "reason": str(reason)}
        except Exception as error:  # noqa: BLE001 - a failing participant is a result, not a crash
            status[p.label] = {
                "status": "error",
                "op": state["op"],
                "reason": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                "traceback": traceback.format_exc(),
            }
        if p.kind == "backend":
            ctx.agree(p, status[p.label])
    return outputs, status


def _sharded_spec(plan: Plan, group: list[int], rank: int, world: int, channels: int, control: Any) -> dict:
    """{case index: this rank's spec outputs (or the spec's traceback)} for a group of <= world cases.

    Rank j computes the whole world's spec outputs of case group[j] and scatters them, one slice per rank:
    the single-process spec runs once per case instead of once per rank.
    """
    mine: Any = None
    if rank < len(group):
        try:
            mine = spec_outputs(build_inputs(plan.cases[group[rank]], world), channels)
        except Exception:  # noqa: BLE001 - reported by every rank as the spec's error
            mine = traceback.format_exc()
    got = {}
    for owner, index in enumerate(group):
        send = None
        if rank == owner:
            send = [mine] * world if isinstance(mine, str) else [_freeze(o) for o in mine]
        received: list[Any] = [None]
        dist.scatter_object_list(received, send, src=owner, group=control)
        got[index] = _thaw(received[0])
    return got


@dataclass
class _Frozen:
    """A tensor as plain bytes: pickles for any dtype (float8 included) without torch's storage pickling."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def _freeze(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        # The bytes straight from memory (ctypes): no numpy, which a CPU install need not have.
        data = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""
        return _Frozen(str(t.dtype).removeprefix("torch."), tuple(t.shape), data)
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, _Frozen):
        dtype = getattr(torch, value.dtype)
        if not value.data:
            return torch.empty(value.shape, dtype=dtype)
        return torch.frombuffer(bytearray(value.data), dtype=torch.uint8).view(dtype).reshape(value.shape)
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_thaw(v) for v in value)
    return value


def _channels(world: int) -> int:
    from .. import Buffer

    return Buffer.get_dispatch_config(world).num_sms // 2


def _rank_entry(rank: int, world: int, plan: Plan, setup: Callable[[], Any] | str | None) -> dict:
    return run_rank(rank, world, plan, setup)


def run_local(
    world: int,
    plan: Plan,
    *,
    setup: Callable[[], Any] | str | None = None,
    dist_backend: str | None = None,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
) -> Report:
    """Run `plan` on a fresh local world of `world` ranks (`deep_ep.testing.run_ranks`, with extra environment
    variables `env` in every rank); returns the report."""
    from .launcher import run_ranks

    backend = dist_backend or plan.world_backend
    results = run_ranks(world, _rank_entry, plan, setup, timeout=timeout, backend=backend, env=env)
    return Report(plan, results)


def gather_results(result: dict) -> list[dict]:
    """Every rank's `run_rank` result, on every rank (one all_gather_object over the world)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    return gathered


# ---------------------------------------------------------------------------------------------------------
# Comparison (SPEC section 9).
# ---------------------------------------------------------------------------------------------------------
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """[numel, element_size] uint8: the raw bits of each element."""
    t = t.contiguous()
    if t.numel() == 0:
        return torch.zeros(0, max(t.element_size(), 1), dtype=torch.uint8)
    return t.reshape(-1).view(torch.uint8).reshape(t.numel(), t.element_size())


def _scalar(t: torch.Tensor) -> Any:
    if t.dtype == torch.bool:
        return bool(t)
    if _is_float(t.dtype):
        v = float(t.float()) if t.dtype not in _FLOATS else float(t)
        return v if math.isfinite(v) else repr(v)
    return int(t)


def _bits_hex(t: torch.Tensor) -> str:
    return "0x" + bytes(reversed(_bytes(t.reshape(1))[0].tolist())).hex()


def float32_ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int64 [...]: float32 steps between a and b (0 = equal values; +0.0 and -0.0 count as equal)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.float().contiguous().view(torch.int32).long()
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # monotone in the float value

    return (ordered(a) - ordered(b)).abs()


def bf16_ulp(value: torch.Tensor) -> torch.Tensor:
    """float64: the bf16 ulp at |value| (the gap to the next bf16 up; the smallest subnormal at 0)."""
    mag = value.to(torch.bfloat16).abs()
    up = (mag.view(torch.int16) + 1).view(torch.bfloat16)
    return up.double() - mag.double()


def compare_tensor(
    op: str,
    name: str,
    expected: Any,
    actual: Any,
    *,
    rule: str = "bits",
    bound: torch.Tensor | None = None,
    index_of: torch.Tensor | None = None,
    max_records: int = 4,
    note: str = "",
) -> dict:
    """Compare one output; returns a check dict (op, tensor, rule, compared, differing, failing, max_abs_err,
    bit_equal, passed, mismatches). Lists/ints are compared as int64 tensors, None only with None.

    rule: "bits" (bit for bit), "int8" (|actual - expected| <= 1), "ulp1" (within 1 float32 ulp), "bound"
    (|actual - expected| <= bound, elementwise). index_of: int64 [M, p] mapping the leading dimension of the
    compared tensors to an index prefix in the original output (rows selected or reordered).
    """
    check = _check(op, name, rule, note)
    if expected is None or actual is None:
        if (expected is None) != (actual is None):
            _fail(check, expected, actual, "None on one side")
        return check
    if isinstance(expected, list) or isinstance(actual, list):
        # DeepEP returns Python lists of Python ints (user code feeds them to range() and splits): a tensor or
        # floats with the right values is still wrong.
        if not (_is_int_list(expected) and _is_int_list(actual)):
            return _fail(check, expected, actual, "not a Python list of int")
        expected, actual = torch.tensor(expected, dtype=torch.int64), torch.tensor(actual, dtype=torch.int64)
    if isinstance(expected, int):
        expected = torch.tensor(expected, dtype=torch.int64)
    if isinstance(actual, int):
        actual = torch.tensor(actual, dtype=torch.int64)
    if not isinstance(actual, torch.Tensor):
        return _fail(check, expected, actual, "not a tensor")
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return _fail(check, expected, actual, "dtype/shape")
    a, e = actual.contiguous(), expected.contiguous()
    check["compared"] = a.numel()
    if a.numel() == 0:
        return check
    differ = (_bytes(a) != _bytes(e)).any(1)
    if _is_float(a.dtype):
        af, ef = a.double().reshape(-1), e.double().reshape(-1)
        err = (af - ef).abs()
        both_nan = af.isnan() & ef.isnan()
        err = torch.where(both_nan, torch.zeros_like(err), err)
        err = torch.where(err.isnan(), torch.full_like(err, math.inf), err)  # one side NaN
    else:
        err = (a.long().reshape(-1) - e.long().reshape(-1)).abs().double()
    err = torch.where(differ, err, torch.zeros_like(err))
    if rule == "bits":
        failing = differ
    elif rule == "int8":
        failing = err > 1
    elif rule == "ulp1":
        failing = differ & (float32_ulp_distance(a.reshape(-1), e.reshape(-1)) > 1)
    elif rule == "bound":
        assert bound is not None
        failing = differ & ~(err <= bound.double().reshape(-1))
    else:
        raise ValueError(f"unknown rule {rule!r}")
    check["differing"] = int(differ.sum())
    check["failing"] = int(failing.sum())
    check["max_abs_err"] = float(err.max())
    check["bit_equal"] = check["differing"] == 0
    check["passed"] = check["failing"] == 0

    def record(flat: int) -> dict:
        index = [int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)]
        if index_of is not None:
            index = [int(i) for i in index_of[index[0]].tolist()] + index[1:]
        entry = {"index": index, "expected": _scalar(e.reshape(-1)[flat]), "actual": _scalar(a.reshape(-1)[flat])}
        if _is_float(a.dtype):
            entry["expected_bits"] = _bits_hex(e.reshape(-1)[flat])
            entry["actual_bits"] = _bits_hex(a.reshape(-1)[flat])
        if rule == "bound":
            entry["bound"] = float(bound.reshape(-1)[flat])
        return entry

    for flat in failing.nonzero().flatten()[:max_records].tolist():
        check["mismatches"].append(record(flat))
    if check["differing"] and check["passed"]:  # within the rule, yet not bit-equal: say where
        check["first_difference"] = record(int(differ.nonzero()[0, 0]))
    return check


def _check(op: str, name: str, rule: str = "bits", note: str = "") -> dict:
    return {
        "op": op,
        "tensor": name,
        "rule": rule,
        "compared": 0,
        "differing": 0,
        "failing": 0,
        "max_abs_err": 0.0,
        "bit_equal": True,
        "passed": True,
        "mismatches": [],
        "note": note,
    }


def _fail(check: dict, expected: Any, actual: Any, note: str) -> dict:
    """Mark `check` failed as a whole (nothing element-wise comparable), with `note` saying why."""
    check.update(bit_equal=False, passed=False, failing=1, max_abs_err=math.inf, note=check["note"] or note)
    check["mismatches"].append(
        {"index": None, "expected": _describe(expected), "actual": _describe(actual), "note": note}
    )
    return check


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)  # bool is no count


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def compare_outputs(
    inputs: Inputs,
    rank: int,
    expected: Outputs,
    actual: Outputs,
    *,
    rules: str = "spec9",
    canonical: bool = False,
    max_records: int = 4,
) -> list[dict]:
    """All checks of one participant against the oracle on one rank (SPEC 9 rules, or "exact")."""
    exact = rules == "exact"
    checks: list[dict] = []
    for op in OPS:
        if op not in expected and op not in actual:
            continue
        if op not in actual or op not in expected:
            side = "participant" if op not in actual else "oracle"
            checks.append(_fail(_check(op, "(outputs)"), None, None, f"no {side} outputs"))
            continue
        try:
            checks += _compare_op(inputs, rank, op, expected[op], actual[op], exact, canonical, max_records)
        except Exception as error:  # noqa: BLE001 - malformed outputs are a failing check, not a dead report
            reason = f"the comparison raised {type(error).__name__}: {error}"
            checks.append(_fail(_check(op, "(comparison)"), None, None, reason))
    for c in checks:
        c["rank"] = rank
    return checks


def _compare_op(
    inputs: Inputs, rank: int, op: str, e: dict, a: dict, exact: bool, canonical: bool, max_records: int
) -> list[dict]:
    if op == "low_latency_dispatch":
        return _compare_ll_dispatch(inputs, e, a, exact=exact, canonical=canonical, max_records=max_records)
    if op == "low_latency_combine":
        return [_compare_ll_combine(inputs, rank, e, a, exact=exact, max_records=max_records)]
    # SPEC 4: with num_worst_tokens, rows past num_recv are unspecified but in recv_topk_idx (-1): not compared
    rows = num_received(inputs.workload, rank) if op in _WORST_OPS and not exact else None
    checks = []
    for name, value in e.items():
        if op in _DISPATCH_OPS and not exact and name in _OTHER_HANDLE_ITEMS:
            continue  # SPEC 9: of the handle, items 0 and 3 only
        got, note = a.get(name), ""
        if rows is not None and name in _UNSPECIFIED_TAILS and _same_shape(value, got):
            value, got, note = value[:rows], got[:rows], "rows below num_recv (the padding is unspecified)"
        checks.append(compare_tensor(op, name, value, got, max_records=max_records, note=note))
    return checks


def _same_shape(a: Any, b: Any) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape


def _ll_row_selection(
    counts: torch.Tensor, src_info: torch.Tensor, layout_range: torch.Tensor | None, canonical: bool
) -> torch.Tensor:
    """int64 [M, 2]: (expert, row) of the compared rows, `counts[i]` rows per expert.

    In canonical order the rows of each expert are sorted by (source rank, src_info); the source of a row
    is the block of `layout_range` (`(begin << 32) | count` per source) that contains it.
    """
    picks = []
    for i, n in enumerate(counts.tolist()):
        rows = torch.arange(n)
        if canonical and n:
            source = torch.full((n,), layout_range.shape[1], dtype=torch.int64)  # outside every block: last
            for s, packed in enumerate(layout_range[i].tolist()):
                begin, count = packed >> 32, packed & 0xFFFFFFFF
                inside = (rows >= begin) & (rows < begin + count)
                source = torch.where(inside, torch.full_like(source, s), source)
            key = source * (1 << 32) + src_info[i, :n].long()
            rows = rows[torch.sort(key, stable=True).indices]
        picks.append(torch.stack([torch.full_like(rows, i), rows], 1))
    return torch.cat(picks) if picks else torch.zeros(0, 2, dtype=torch.int64)


def _compare_ll_dispatch(
    inputs: Inputs, e: dict, a: dict, *, exact: bool, canonical: bool, max_records: int
) -> list[dict]:
    op = "low_latency_dispatch"
    int8 = inputs.case.dtype == "int8" and not exact
    checks = [
        compare_tensor(op, "recv_count", e["recv_count"], a["recv_count"], max_records=max_records),
        compare_tensor(op, "handle_sizes", e["handle_sizes"], a["handle_sizes"], max_records=max_records),
        compare_tensor(
            op, "recv_scales_strides", e["recv_scales_strides"], a["recv_scales_strides"], max_records=max_records
        ),
    ]
    # Canonical order reads both sides' layout_range: only where both are int64 [L, R] (else rows are compared in
    # place, and the layout_range check below reports the malformed one).
    shape = (e["recv_count"].numel(), inputs.num_ranks)
    canonical = canonical and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.int64 and tuple(t.shape) == shape
        for t in (e["layout_range"], a["layout_range"])
    )
    if canonical:
        checks.append(
            compare_tensor(
                op,
                "layout_range",
                e["layout_range"] & 0xFFFFFFFF,
                a["layout_range"] & 0xFFFFFFFF,
                max_records=max_records,
                note="counts only (canonical row order)",
            )
        )
    else:
        checks.append(compare_tensor(op, "layout_range", e["layout_range"], a["layout_range"], max_records=max_records))
    counts = e["recv_count"].long()
    names = ("src_info", "recv_x", "recv_scales")
    shapes_ok = all(
        isinstance(a.get(n), torch.Tensor) and a[n].shape == e[n].shape and a[n].dtype == e[n].dtype
        for n in names
        if e.get(n) is not None
    ) and (a.get("recv_scales") is None) == (e.get("recv_scales") is None)
    if not shapes_ok:
        for n in names:
            checks.append(compare_tensor(op, n, e.get(n), a.get(n), max_records=max_records))
        return checks
    counts = counts.clamp(0, e["src_info"].shape[1])  # an oracle count past its rows: compare what exists
    rows_e = _ll_row_selection(counts, e["src_info"], e["layout_range"], canonical)
    rows_a = _ll_row_selection(counts, a["src_info"], a["layout_range"], canonical)
    note = "rows below the oracle's recv_count" + (", canonical order (source rank, src_info)" if canonical else "")

    def pick(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return t[rows[:, 0], rows[:, 1]]

    checks.append(
        compare_tensor(
            op,
            "src_info",
            pick(e["src_info"], rows_e),
            pick(a["src_info"], rows_a),
            index_of=rows_e,
            max_records=max_records,
            note=note,
        )
    )
    checks.append(
        compare_tensor(
            op,
            "recv_x",
            pick(e["recv_x"], rows_e),
            pick(a["recv_x"], rows_a),
            rule="int8" if int8 else "bits",
            index_of=rows_e,
            max_records=max_records,
            note=note,
        )
    )
    if e.get("recv_scales") is not None:
        checks.append(
            compare_tensor(
                op,
                "recv_scales",
                pick(e["recv_scales"], rows_e),
                pick(a["recv_scales"], rows_a),
                rule="ulp1" if int8 else "bits",
                index_of=rows_e,
                max_records=max_records,
                note=note,
            )
        )
    return checks


def _compare_ll_combine(inputs: Inputs, rank: int, e: dict, a: dict, *, exact: bool, max_records: int) -> dict:
    op = "low_latency_combine"
    if inputs.case.dtype != "int8" or exact:
        return compare_tensor(op, "combined_x", e["combined_x"], a["combined_x"], max_records=max_records)
    from ..quant import per_token_cast_to_int8

    w = inputs.workload
    idx, weights = w.topk_idx[rank], w.topk_weights[rank]
    _, scale = per_token_cast_to_int8(w.x[rank])  # scale_t: the int8 scale of token t's row
    weight_sum = torch.where(idx >= 0, weights.double().abs(), torch.zeros_like(weights.double())).sum(1)
    bound = (weight_sum * scale.double() / 2).unsqueeze(1) + bf16_ulp(e["combined_x"].float())
    return compare_tensor(
        op,
        "combined_x",
        e["combined_x"],
        a["combined_x"],
        rule="bound",
        bound=bound,
        max_records=max_records,
        note="|out - ref| <= sum_k |w_k| * scale_t / 2 + 1 bf16 ulp of |ref| (SPEC 9, int8)",
    )


# ---------------------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _result(row: dict) -> str:
    if row["passed"]:
        return "PASS"
    return "ERROR" if row["errors"] and not row["failing"] else "FAIL"


def _fmt_err(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return "inf"
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


@dataclass
class Report:
    """All ranks' results of one plan: the table, the first mismatches, JSON, the exit status."""

    plan: Plan
    rank_results: list[dict]
    checks: list[dict] = field(init=False)
    errors: list[dict] = field(init=False)
    skips: list[dict] = field(init=False)

    def __post_init__(self) -> None:
        op_order = {op: i for i, op in enumerate(OPS)}
        self.checks, self.errors, self.skips = [], [], []
        for result in self.rank_results:
            for case in result["cases"]:
                self.checks += case["checks"]
                for label, status in case["status"].items():
                    entry = dict(status, participant=label, rank=result["rank"], case_index=case["index"])
                    if status["status"] == "error":
                        self.errors.append(entry)
                    elif status["status"] == "skipped":
                        self.skips.append(entry)
        self.checks.sort(key=lambda c: (c["case_index"], op_order.get(c["op"], 99), c["rank"]))
        self.errors.sort(key=lambda c: (c["case_index"], c["rank"]))

    @property
    def not_compared(self) -> list[str]:
        """Participants compared with the oracle in no case: skipped everywhere, the oracle skipped, or no cases."""
        compared = {c["participant"] for c in self.checks}
        return [p.label for p in self.plan.participants[1:] if p.label not in compared]

    @property
    def result(self) -> str:
        """ "FAIL" on any mismatch or error, else "NOT RUN" where a participant was compared in no case (a
        skipped backend or an empty plan proves nothing), else "PASS"."""
        if self.errors or not all(c["passed"] for c in self.checks):
            return "FAIL"
        return "NOT RUN" if self.not_compared else "PASS"

    @property
    def ok(self) -> bool:
        return self.result == "PASS"

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.result]

    def case(self, index: int) -> Case:
        return self.plan.cases[index]

    def rows(self) -> list[dict]:
        """One row per (participant, op): cases, elements, max abs error, bit-equal, passed."""
        table: dict[tuple, dict] = {}
        for c in self.checks:
            key = (c["participant"], c["op"])
            row = table.setdefault(
                key,
                {
                    "participant": c["participant"],
                    "oracle": c["oracle"],
                    "op": c["op"],
                    "cases": set(),
                    "elements": 0,
                    "max_abs_err": 0.0,
                    "bit_equal": True,
                    "passed": True,
                    "failing": 0,
                },
            )
            row["cases"].add(c["case_index"])
            row["elements"] += c["compared"]
            row["max_abs_err"] = max(row["max_abs_err"], c["max_abs_err"])
            row["bit_equal"] &= c["bit_equal"]
            row["passed"] &= c["passed"]
            row["failing"] += c["failing"]
        for e in self.errors:
            key = (e["participant"], e.get("op", "setup"))
            row = table.setdefault(
                key,
                {
                    "participant": e["participant"],
                    "oracle": self.plan.oracle.label,
                    "op": e.get("op", "setup"),
                    "cases": set(),
                    "elements": 0,
                    "max_abs_err": math.nan,
                    "bit_equal": False,
                    "passed": False,
                    "failing": 0,
                },
            )
            row["cases"].add(e["case_index"])
            row["passed"] = row["bit_equal"] = False
            row["errors"] = row.get("errors", 0) + 1
        op_order = {op: i for i, op in enumerate(OPS)}
        labels = [p.label for p in self.plan.participants]
        rows = sorted(
            table.values(),
            key=lambda r: (
                labels.index(r["participant"]) if r["participant"] in labels else 99,
                op_order.get(r["op"], 99),
            ),
        )
        for r in rows:
            r["cases"] = len(r["cases"])
            r.setdefault("errors", 0)
        return rows

    def mismatches(self, limit: int | None = None) -> list[dict]:
        """Failing elements in case, op, rank order: case, participant, rank, op, tensor, index, values."""
        out = []
        for c in self.checks:
            if c["passed"]:
                continue
            for m in c["mismatches"]:
                out.append(
                    {
                        "case": self.case(c["case_index"]).id,
                        "case_index": c["case_index"],
                        "participant": c["participant"],
                        "oracle": c["oracle"],
                        "rank": c["rank"],
                        "op": c["op"],
                        "tensor": c["tensor"],
                        "rule": c["rule"],
                        "failing": c["failing"],
                        "compared": c["compared"],
                        **m,
                    }
                )
                if limit is not None and len(out) >= limit:
                    return out
        return out

    def table(self) -> str:
        header = (
            f"{'op':<22} {'participant vs oracle':<34} {'cases':>5} {'elements':>12} {'max abs err':>11} "
            f"{'bit-equal':>9} {'result':>6}"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows():
            vs = f"{r['participant']} vs {r['oracle']}"
            lines.append(
                f"{r['op']:<22} {vs:<34} {r['cases']:>5} {r['elements']:>12,} {_fmt_err(r['max_abs_err']):>11} "
                f"{'yes' if r['bit_equal'] else 'no':>9} {_result(r):>6}"
            )
        return "\n".join(lines)

    def format(self, max_mismatches: int = 10) -> str:
        plan = self.plan
        world = self.rank_results[0]["world"] if self.rank_results else 0
        lines = [
            f"deep_ep crosscheck: world={world} ({plan.world_backend}) rules={plan.rules} cases={len(plan.cases)} "
            f"participants: {', '.join(p.label for p in plan.participants)} (oracle: {plan.oracle.label})",
        ]
        orders = self.rank_results[0]["row_order"] if self.rank_results else {}
        unordered = [label for label, order in orders.items() if order == "any"]
        if unordered:
            lines.append(f"canonical low-latency row order for: {', '.join(unordered)}")
        lines.append(self.table())
        if self.skips:
            seen = sorted({(s["participant"], s["reason"]) for s in self.skips})
            lines.append(f"skipped: {len({(s['participant'], s['case_index']) for s in self.skips})} participant-cases")
            lines += [f"  {label}: {reason}" for label, reason in seen[:10]]
        if self.errors:
            grouped: dict[tuple, list[int]] = {}
            for e in self.errors:
                grouped.setdefault((e["case_index"], e["participant"], e.get("op"), e["reason"]), []).append(e["rank"])
            lines.append(f"errors ({len(grouped)} participant-cases):")
            for (index, label, op, reason), ranks in list(grouped.items())[:max_mismatches]:
                lines.append(f"  case {index} [{self.case(index).id}] ranks {ranks} {label} {op}: {reason}")
        bad = self.mismatches()
        if bad:
            lines.append(f"first mismatches ({min(len(bad), max_mismatches)} of {len(bad)} recorded):")
            for m in bad[:max_mismatches]:
                extra = ""
                if "expected_bits" in m:
                    extra = f" (bits {m['expected_bits']} / {m['actual_bits']})"
                if "bound" in m:
                    extra += f" bound {m['bound']:.3g}"
                # A whole-tensor failure (shape, type, missing) has no elements to count: its note says why.
                count = f"{m['failing']} of {m['compared']} failing" if m["index"] is not None else m.get("note", "")
                lines.append(
                    f"  case {m['case_index']} [{m['case']}] rank {m['rank']} {m['op']}.{m['tensor']}"
                    f"{m['index'] if m['index'] is not None else ''}: expected {m['expected']}, actual {m['actual']}"
                    f"{extra}  [{m['participant']} vs {m['oracle']}, {count}]"
                )
        if self.result == "NOT RUN":
            lines.append(
                f"compared in no case: {', '.join(self.not_compared)}"
                + ("" if self.plan.cases else " (the plan has no cases)")
            )
        lines.append(f"RESULT: {self.result}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        plan = self.plan
        return _json_safe(
            {
                "result": self.result,
                "not_compared": self.not_compared,
                "world": self.rank_results[0]["world"] if self.rank_results else 0,
                "world_backend": plan.world_backend,
                "rules": plan.rules,
                "participants": [dict(asdict(p), label=p.label) for p in plan.participants],
                "oracle": plan.oracle.label,
                "row_order": self.rank_results[0]["row_order"] if self.rank_results else {},
                "cases": [dict(asdict(c), id=c.id) for c in plan.cases],
                "summary": self.rows(),
                "mismatches": self.mismatches(),
                "errors": self.errors,
                "skips": self.skips,
                "checks": [{k: v for k, v in c.items() if k != "mismatches"} for c in self.checks],
                "seconds": {
                    str(case["index"]): max(r["cases"][i]["seconds"] for r in self.rank_results)
                    for i, case in enumerate(self.rank_results[0]["cases"] if self.rank_results else [])
                },
            }
        )

    def write_json(self, path: str) -> None:
        text = json.dumps(self.to_dict(), indent=1)
        if path == "-":
            print(text)
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
