"""The Ascend backend: DeepEP's low-latency mode on torch_npu's fused MoE ops (MC2) over HCCL.

Written against the documented torch_npu API (torch-npu 2.14.0 schemas, the op-plugin and ops-transformer
docs); no NPU or CANN toolkit was available while it was written, so it is verified against a CPU
EMULATION of those ops (`deep_ep.testing.npu_emulation`), not on hardware. docs/ASCEND.md says what that
does and does not prove.

- Low-latency mode calls `torch_npu.npu_moe_distribute_dispatch_v2` / `npu_moe_distribute_combine_v2`
  (the v1 ops where v2 is missing) and converts their packed per-expert rows to the SPEC layout on the
  device, with no host synchronisation.
- Normal mode is the reference algorithm (`ReferenceBackend`) over the same HCCL group: torch_npu has no
  op whose results match SPEC sections 3-5 exactly, so none is used there.
- A low-latency call outside the ops' documented limits (`SUPPORT_MATRIX`) runs the reference algorithm on
  the same group, which gives the SPEC result exactly (logged once per reason); with the environment
  variable `DEEP_EP_ASCEND_FALLBACK=raise` it raises instead, naming the limit.

Nothing here imports torch_npu at module level: `import deep_ep` must work without CANN.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .. import quant
from ..comm import Pending
from ..errors import UnsupportedFeatureError
from .base import LowLatencyDispatchArgs
from .reference import ReferenceBackend
from .reference_low_latency import LowLatencyRoute

log = logging.getLogger("deep_ep.ascend")

FALLBACK_ENV = "DEEP_EP_ASCEND_FALLBACK"  # "reference" (default) or "raise"
_HCCL_BUFFSIZE_DEFAULT_MB = 200  # CANN's default when HCCL_BUFFSIZE is unset (op docs)
_MB = 1 << 20


# ---- support matrix -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChipLimits:
    """What one chip accepts from one generation of the fused ops (torch_npu / aclnn docs, see ASCEND.md).

    `world_sizes` is a set of allowed group sizes, or a (low, high) range when `world_range` is set.
    The mask flags say which forms of `x_active_mask` the ops take on this chip (the v1 ops take none).
    """

    chip: str
    ops: str  # "v2" or "v1"
    world_sizes: frozenset[int]
    world_range: tuple[int, int] | None
    min_hidden: int
    max_hidden: int
    hidden_multiple: int
    max_tokens: int
    max_topk: int
    max_experts: int
    max_local_experts: int | None
    token_mask: bool  # 1-D x_active_mask [BS] (true before false)
    entry_mask: bool  # 2-D x_active_mask [BS, K]
    expert_scales: bool  # dispatch takes expert_scales and combine needs its expand_scales (A2)
    comm_alg: str | None  # what to pass as comm_alg where the op's schema has it (None: leave the default)

    def world_ok(self, num_ranks: int) -> bool:
        if self.world_range is not None:
            return self.world_range[0] <= num_ranks <= self.world_range[1]
        return num_ranks in self.world_sizes

    def world_text(self) -> str:
        if self.world_range is not None:
            return f"{self.world_range[0]}..{self.world_range[1]}"
        return "{" + ", ".join(str(n) for n in sorted(self.world_sizes)) + "}"


def _limits(chip: str, ops: str, **kw: Any) -> ChipLimits:
    defaults: dict[str, Any] = dict(world_sizes=frozenset(), world_range=None, max_local_experts=None, comm_alg=None)
    defaults.update(kw)
    return ChipLimits(chip=chip, ops=ops, **defaults)


# A2 = Atlas A2 (Ascend910B*), A3 = Atlas A3 (Ascend910_93*). A2 uses comm_alg="fullmesh": the only A2
# algorithm that takes x_active_mask, with the HCCL_BUFFSIZE formula below.
SUPPORT_MATRIX: dict[tuple[str, str], ChipLimits] = {
    ("A2", "v2"): _limits(
        "A2",
        "v2",
        world_sizes=frozenset({16, 32, 64, 128, 256}),
        min_hidden=32,
        max_hidden=7168,
        hidden_multiple=32,
        max_tokens=256,
        max_topk=16,
        max_experts=512,
        max_local_experts=24,
        token_mask=True,
        entry_mask=False,
        expert_scales=True,
        comm_alg="fullmesh",
    ),
    ("A3", "v2"): _limits(
        "A3",
        "v2",
        world_range=(2, 768),
        min_hidden=1024,
        max_hidden=8192,
        hidden_multiple=1,
        max_tokens=512,
        max_topk=16,
        max_experts=1024,
        token_mask=True,
        entry_mask=True,
        expert_scales=False,
    ),
    ("A2", "v1"): _limits(
        "A2",
        "v1",
        world_sizes=frozenset({16, 32, 64}),
        min_hidden=32,
        max_hidden=7168,
        hidden_multiple=32,
        max_tokens=256,
        max_topk=16,
        max_experts=512,
        max_local_experts=24,
        token_mask=False,
        entry_mask=False,
        expert_scales=True,
    ),
    ("A3", "v1"): _limits(
        "A3",
        "v1",
        world_sizes=frozenset({8, 16, 32, 64, 128, 144, 256, 288}),
        min_hidden=7168,
        max_hidden=7168,
        hidden_multiple=1,
        max_tokens=512,
        max_topk=8,
        max_experts=512,
        token_mask=False,
        entry_mask=False,
        expert_scales=False,
    ),
}


def unsupported_reason(
    limits: ChipLimits, num_ranks: int, tokens: int, hidden: int, num_topk: int, num_experts: int
) -> str | None:
    """Why the fused ops cannot serve this low-latency shape on this chip (naming the limit), or None."""
    name = f"{limits.chip} {limits.ops}"
    experts_per_rank = num_experts // num_ranks
    if not limits.world_ok(num_ranks):
        return f"group size {num_ranks} is not accepted by the {name} ops (allowed: {limits.world_text()})"
    if not limits.min_hidden <= hidden <= limits.max_hidden or hidden % limits.hidden_multiple:
        multiple = f", a multiple of {limits.hidden_multiple}" if limits.hidden_multiple > 1 else ""
        return f"hidden={hidden} is outside the {name} range [{limits.min_hidden}, {limits.max_hidden}]{multiple}"
    if tokens > limits.max_tokens:
        return f"num_max_dispatch_tokens_per_rank={tokens} exceeds the {name} limit of {limits.max_tokens} tokens"
    if num_topk < 1:
        return f"num_topk={num_topk}: the {name} ops need 0 < K (no selections to send)"
    if num_topk > limits.max_topk:
        return f"num_topk={num_topk} exceeds the {name} limit of {limits.max_topk}"
    if num_topk > num_experts:
        return f"num_topk={num_topk} exceeds num_experts={num_experts} (the ops need K distinct expert ids)"
    if num_experts > limits.max_experts:
        return f"num_experts={num_experts} exceeds the {name} limit of {limits.max_experts}"
    if limits.max_local_experts is not None and experts_per_rank > limits.max_local_experts:
        return f"{experts_per_rank} experts per rank exceed the {name} limit of {limits.max_local_experts}"
    return None


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def required_hccl_buffsize_mb(
    limits: ChipLimits, num_ranks: int, tokens: int, hidden: int, num_topk: int, num_experts: int
) -> int:
    """The smallest HCCL_BUFFSIZE (MB) the op docs allow for this shape (BS = tokens, x in bf16)."""
    local = num_experts // num_ranks
    if limits.chip == "A2":  # fullmesh: 2 * (BS * R * min(L, K) * H * sizeof(uint16) + 2 MB)
        need = 2 * (tokens * num_ranks * min(local, num_topk) * hidden * 2 + 2 * _MB)
        return math.ceil(need / _MB)
    if limits.ops == "v1":  # 1024^2 * (size - 2) / 2 >= BS * 2 * (H + 128) * (R * L + K + 1)
        need = tokens * 2 * (hidden + 128) * (num_ranks * local + num_topk + 1)
        return 2 + math.ceil(2 * need / _MB)
    # A3 v2: >= 2 and >= 2 * (L * maxBs * R * Align512(Align32(2H) + 64) + (K + shared) * maxBs * Align512(2H)),
    # with sharedExpertNum = 0 as this backend passes it.
    need = 2 * (
        local * tokens * num_ranks * _align(_align(2 * hidden, 32) + 64, 512)
        + num_topk * tokens * _align(2 * hidden, 512)
    )
    return max(2, math.ceil(need / _MB))


def hccl_buffsize_mb() -> int:
    """HCCL_BUFFSIZE as CANN reads it (MB), its documented default when unset."""
    text = os.environ.get("HCCL_BUFFSIZE", "").strip()
    if not text:
        return _HCCL_BUFFSIZE_DEFAULT_MB
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"HCCL_BUFFSIZE={text!r} must be an integer number of MB (as CANN reads it)") from None


def classify_chip(device_name: str) -> str | None:
    """Chip family: "A2" for Atlas A2 (Ascend910B1..B4), "A3" for Atlas A3 (Ascend910_93xx), else None."""
    if device_name.startswith("Ascend910B"):
        return "A2"
    if device_name.startswith("Ascend910_93"):
        return "A3"
    return None


# ---- the vendor seam ----------------------------------------------------------------------------------
class Vendor:
    """Everything this backend asks of torch_npu and HCCL, in one object.

    Tests install `deep_ep.testing.npu_emulation`, which replaces `torch_npu` in `sys.modules` with an
    EMULATION and swaps this object for one that names gloo groups as HCCL ones; every other line of
    the backend runs unchanged.
    """

    def torch_npu(self) -> Any:
        import torch_npu  # noqa: F401 - imported only when the backend is asked for

        return torch_npu

    def group_backend(self, group: dist.ProcessGroup) -> str:
        return str(dist.get_backend(group))

    def new_op_group(self, group: dist.ProcessGroup) -> dist.ProcessGroup:
        """A communicator of the same ranks, used only by the fused ops: their docs forbid other ops in
        the communication domain they use, and the façade's own collectives run on `group`."""
        ranks = dist.get_process_group_ranks(group)
        return dist.new_group(ranks, backend=dist.get_backend(group), use_local_synchronization=True)

    def hccl_comm_name(self, group: dist.ProcessGroup) -> str:
        return group._get_backend(torch.device("npu")).get_hccl_comm_name(dist.get_rank())


vendor = Vendor()
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


# ---- routing helpers (pure tensor functions, tested directly) ----------------------------------------
PAD_ID = -2  # a padding token (t >= N) in the gathered ids; -1 stays "no expert"


def substitute_ids(ids: torch.Tensor, num_experts: int, experts_per_rank: int) -> torch.Tensor:
    """int32 [R, T, K]: every negative entry replaced by an expert the row does not use, so each row holds
    K distinct valid ids as the ops require; valid entries are unchanged.

    Substitutes are the row's unused experts in the order of the source rank's own experts first
    (rank s starts at expert s*L), so the zero-weight traffic they cause on A2 stays on the source rank.
    Every rank computes every source's substitutes from the same gathered ids, identically.
    """
    num_ranks, tokens, num_topk = ids.shape
    device = ids.device
    flat = ids.reshape(num_ranks * tokens, num_topk).long()
    start = (torch.arange(num_ranks, device=device) * experts_per_rank).repeat_interleave(tokens).unsqueeze(1)
    rotated = torch.where(flat >= 0, (flat - start) % num_experts, num_experts)
    used = torch.zeros(flat.shape[0], num_experts + 1, dtype=torch.bool, device=device)
    used.scatter_(1, rotated, True)
    free_rank = (~used[:, :num_experts]).long().cumsum(1)  # nondecreasing: 1 + rank among unused experts
    missing = flat < 0
    nth = missing.long().cumsum(1)  # the j-th missing entry of a row takes the j-th unused expert
    pick = torch.searchsorted(free_rank, torch.where(missing, nth, 1))
    replaced = (pick.clamp(max=num_experts - 1) + start) % num_experts
    return torch.where(missing, replaced, flat).int().view(num_ranks, tokens, num_topk)


@dataclass
class _Layout:
    """Where the ops' packed rows go in the SPEC layout, for this rank."""

    pack_row: torch.Tensor  # int64 [L*R*T]: packed row of each SPEC slot, `capacity` = none
    src_info: torch.Tensor  # int32 [L, R*T]
    recv_count: torch.Tensor  # int32 [L]
    layout_range: torch.Tensor  # int64 [L, R]


def spec_layout(
    sent: torch.Tensor, real: torch.Tensor, expert_ids: torch.Tensor, rank: int, experts_per_rank: int, capacity: int
) -> _Layout:
    """Map the ops' packed rows to SPEC rows, from every source's ids (no host synchronisation).

    sent / real: bool [R, T, K]: which entries the op transmits / which are real selections (substitutes
    and padding are sent on some chips but are not SPEC rows). expert_ids: int32 [R, T, K] as passed to
    the op. The op's rows are grouped by local expert, then source rank, then token; the SPEC rows of an
    expert are its real rows in the same order, so the map keeps the order and drops what is not real.
    """
    num_ranks, tokens, _ = sent.shape
    local = experts_per_rank
    device = sent.device
    slots = local * num_ranks * tokens
    mine = sent & (expert_ids.long() // local == rank)
    expert = expert_ids.long() % local
    source = torch.arange(num_ranks, device=device).view(num_ranks, 1, 1)
    token = torch.arange(tokens, device=device).view(1, tokens, 1)
    flat = (expert * num_ranks * tokens + source * tokens + token).expand_as(mine)
    hit = torch.zeros(slots + 1, dtype=torch.long, device=device)
    hit.scatter_(0, torch.where(mine, flat, slots).reshape(-1), 1)  # a token meets an expert at most once
    is_real = torch.zeros(slots + 1, dtype=torch.long, device=device)
    is_real.scatter_(0, torch.where(mine & real, flat, slots).reshape(-1), 1)
    hit, is_real = hit[:slots], is_real[:slots]
    packed_pos = hit.cumsum(0) - 1  # row of each (e, s, t) in the op's output
    real_grid = is_real.view(local, num_ranks * tokens)
    spec_pos = real_grid.cumsum(1) - 1
    target = torch.where(
        real_grid.bool(), torch.arange(local, device=device).unsqueeze(1) * num_ranks * tokens + spec_pos, slots
    ).reshape(-1)
    pack_row = torch.full((slots + 1,), capacity, dtype=torch.long, device=device)
    pack_row.scatter_(0, target, packed_pos)
    src = torch.zeros(slots + 1, dtype=torch.int32, device=device)
    src.scatter_(0, target, torch.arange(tokens, device=device, dtype=torch.int32).repeat(local * num_ranks))
    per_source = real_grid.view(local, num_ranks, tokens).sum(2)
    begin = per_source.cumsum(1) - per_source
    return _Layout(
        pack_row=pack_row[:slots],
        src_info=src[:slots].view(local, num_ranks * tokens),
        recv_count=real_grid.sum(1).int(),
        layout_range=(begin << 32) | per_source,
    )


# ---- the backend ----------------------------------------------------------------------------------------
@dataclass
class AscendLowLatencyRoute:
    """What combine needs from a fused dispatch: the op's own outputs, passed back unchanged, and the map."""

    num_tokens: int
    capacity: int  # A, rows of the op's expand_x
    pack_row: torch.Tensor
    expert_ids: torch.Tensor  # int32 [T, K], as passed to dispatch
    active_mask: torch.Tensor | None
    assist: torch.Tensor  # assist_info_for_combine (v2) or expand_idx (v1)
    ep_recv_counts: torch.Tensor
    expand_scales: torch.Tensor | None
    extra: dict


class AscendBackend(ReferenceBackend):
    """torch_npu fused MoE ops for low-latency mode; the reference algorithm for normal mode and fallback."""

    name = "ascend"
    device_types = ("npu",)
    priority = 10
    features = frozenset({"normal", "low_latency", "int8", "any_group_size"})

    def __init__(self, comm: Any, device: torch.device, low_latency_quant: str) -> None:
        super().__init__(comm, device, low_latency_quant)
        npu = vendor.torch_npu()
        self.chip = classify_chip(str(npu.npu.get_device_name()))
        v2 = hasattr(npu, "npu_moe_distribute_dispatch_v2") and hasattr(npu, "npu_moe_distribute_combine_v2")
        v1 = hasattr(npu, "npu_moe_distribute_dispatch") and hasattr(npu, "npu_moe_distribute_combine")
        self.ops = "v2" if v2 else "v1" if v1 else None
        self._op_group: dist.ProcessGroup | None = None
        self._op_group_name = ""
        self._checked_sizes: set[tuple[int, ...]] = set()
        self._pass_alg: bool | None = None
        self._op_shape: tuple[int, int] | None = None  # (T, E) of the first fused call: fixed for the communicator

    @classmethod
    def unavailable_reason(cls, group: dist.ProcessGroup, device: torch.device) -> str | None:
        try:
            npu = vendor.torch_npu()
        except Exception as error:  # ImportError, or torch_npu failing to load CANN's libraries
            return f"torch_npu is not installed ({error})"
        try:
            if device.type not in cls.device_types:
                return f"tensors live on {device.type!r}, not an NPU"
            backend = vendor.group_backend(group)
            if "hccl" not in backend:
                return f"the group's backend is {backend!r}; the fused ops need an HCCL group"
            name = str(npu.npu.get_device_name())
            if classify_chip(name) is None:
                return f"chip {name!r} is neither Atlas A2 (Ascend910B*) nor Atlas A3 (Ascend910_93*)"
            ours = torch.__version__.split("+")[0].split(".")[:2]
            theirs = str(getattr(npu, "__version__", "")).split("+")[0].split(".")[:2]
            if theirs != ours:
                return f"torch_npu {npu.__version__} does not match torch {torch.__version__} (major.minor)"
        except Exception as error:  # a broken probe must not break "auto"
            return f"the Ascend availability check failed: {error!r}"
        return None

    @classmethod
    def native_low_latency_quant(cls) -> str:
        return "int8"

    # ---- low-latency mode ---------------------------------------------------------------------------
    def _fallback_reason(self, args: LowLatencyDispatchArgs) -> str | None:
        if self.ops is None:
            return "this torch_npu has no npu_moe_distribute_dispatch(_v2) / combine(_v2) ops"
        if self.chip is None:
            return "the chip is neither Atlas A2 nor A3"
        limits = SUPPORT_MATRIX[(self.chip, self.ops)]
        if limits.chip == "A2" and not self._passes_alg(limits) and hierarchy_selected():
            return (
                "HCCL_INTRA_PCIE_ENABLE=1 with HCCL_INTRA_ROCE_ENABLE=0 selects the A2 'hierarchy' algorithm, whose "
                "combine weights the rows with the scales sent at dispatch (DeepEP's weights come only at combine), "
                f"and this {limits.ops} op cannot be told comm_alg='fullmesh'"
            )
        num_tokens_cap = args.num_max_dispatch_tokens_per_rank
        if self._op_shape not in (None, (num_tokens_cap, args.num_experts)):
            tokens, experts = self._op_shape
            return (
                f"num_max_dispatch_tokens_per_rank={num_tokens_cap}, num_experts={args.num_experts} differ from the "
                f"first fused call's ({tokens}, {experts}): the ops require global_bs (= T * group size) and "
                "moe_expert_num to stay the same in every call on one communicator"
            )
        return unsupported_reason(
            limits, self.comm.size, num_tokens_cap, args.x.shape[1], args.topk_idx.shape[1], args.num_experts
        )

    def _passes_alg(self, limits: ChipLimits) -> bool:
        """Whether calls pass `limits.comm_alg` (older torch_npu builds have no comm_alg keyword: their default)."""
        if self._pass_alg is None:
            npu = vendor.torch_npu()
            self._pass_alg = limits.comm_alg is not None and all(
                _has_kwarg(npu, kind, self.ops, "comm_alg") for kind in ("dispatch", "combine")
            )
        return self._pass_alg

    def _check_buffsize(self, limits: ChipLimits, key: tuple[int, ...]) -> None:
        if key in self._checked_sizes:
            return
        need = required_hccl_buffsize_mb(limits, *key)
        # Collective (every rank checks the same key on the same call): the op docs require one HCCL_BUFFSIZE on
        # all ranks, and a rank that raised here alone would leave the others waiting in the next exchange.
        try:
            mine, unreadable = hccl_buffsize_mb(), ""
        except ValueError as error:
            mine, unreadable = -1, str(error)
        every = [row[0] for row in self.comm.all_gather_ints([mine], "low_latency_dispatch")]
        if -1 in every:
            bad = [rank for rank, value in enumerate(every) if value == -1]
            raise ValueError(unreadable or f"HCCL_BUFFSIZE is not an integer number of MB on rank(s) {bad}")
        if len(set(every)) > 1:
            raise ValueError(
                f"HCCL_BUFFSIZE differs across ranks ({every} MB by rank): the Ascend low-latency ops require the "
                f"same value on every rank. Set HCCL_BUFFSIZE={max(need, *every)} on every rank before it starts."
            )
        have = every[0]
        if have < need:
            num_ranks, tokens, hidden, num_topk, num_experts = key
            raise ValueError(
                f"HCCL_BUFFSIZE={have} MB is too small for the {limits.chip} low-latency ops with "
                f"num_max_dispatch_tokens_per_rank={tokens}, hidden={hidden}, num_topk={num_topk}, "
                f"num_experts={num_experts}, {num_ranks} ranks: the op docs require at least {need} MB. "
                f"Set HCCL_BUFFSIZE={need} (or more) in the environment of every rank before it starts."
            )
        self._checked_sizes.add(key)

    def _op_group_name_for_call(self) -> str:
        # Collective: every rank gets here on the same call, because whether a call takes the fused path
        # depends only on arguments the façade has already checked to agree across ranks.
        if self._op_group is None:
            self._op_group = vendor.new_op_group(self.comm.group)
            self._op_group_name = vendor.hccl_comm_name(self._op_group)
        return self._op_group_name

    def low_latency_dispatch(self, args: LowLatencyDispatchArgs) -> tuple[dict, Any, Pending]:
        reason = self._fallback_reason(args)
        if reason is not None:
            return self._fallback(args, reason)
        limits = SUPPORT_MATRIX[(self.chip, self.ops)]
        npu = vendor.torch_npu()
        comm = self.comm
        num_ranks, rank = comm.size, comm.rank
        x, topk_idx = args.x, args.topk_idx
        num_tokens, hidden = x.shape
        num_topk = topk_idx.shape[1]
        tokens_cap = args.num_max_dispatch_tokens_per_rank
        num_experts = args.num_experts
        local = num_experts // num_ranks
        device = x.device
        self._check_buffsize(limits, (num_ranks, tokens_cap, hidden, num_topk, num_experts))
        group_name = self._op_group_name_for_call()
        self._op_shape = (tokens_cap, num_experts)
        capacity = tokens_cap * num_ranks * min(local, num_topk)  # A, as the op's meta function gives it

        # Every rank needs every source's ids to know which token each received row is (the ops' own
        # bookkeeping outputs are documented as opaque): one small all-gather on the façade's group.
        ids = torch.full((tokens_cap, num_topk), PAD_ID, dtype=torch.int32, device=device)
        ids[:num_tokens] = topk_idx.int()
        gathered = comm.all_gather(ids, "low_latency_dispatch")  # [R, T, K]
        op_ids = substitute_ids(gathered, num_experts, local)
        real = gathered >= 0
        pass_alg = self._passes_alg(limits)
        token_mask = limits.token_mask and (limits.comm_alg is None or pass_alg)
        if limits.entry_mask:
            sent = real
        elif token_mask:
            sent = (gathered != PAD_ID).all(2, keepdim=True).expand_as(real)
        else:
            sent = torch.ones_like(real)
        layout = spec_layout(sent, real, op_ids, rank, local, capacity)

        x_in = x.new_zeros(tokens_cap, hidden)
        x_in[:num_tokens] = x
        kwargs: dict[str, Any] = dict(
            x=x_in,
            expert_ids=op_ids[rank],
            group_ep=group_name,
            ep_world_size=num_ranks,
            ep_rank_id=rank,
            moe_expert_num=num_experts,
            shared_expert_rank_num=0,
            **_shared_expert_num(self.ops),
            quant_mode=2 if args.use_fp8 else 0,
            global_bs=tokens_cap * num_ranks,
            expert_token_nums_type=1,
        )
        active_mask = None
        if limits.entry_mask:
            active_mask = real[rank]
        elif token_mask:
            active_mask = torch.arange(tokens_cap, device=device) < num_tokens
        if active_mask is not None:
            kwargs["x_active_mask"] = active_mask
        if limits.expert_scales:  # A2: weights travel with the rows; 0 marks substitutes and padding
            kwargs["expert_scales"] = real[rank].float()
        if pass_alg:
            kwargs["comm_alg"] = limits.comm_alg
        op = npu.npu_moe_distribute_dispatch_v2 if self.ops == "v2" else npu.npu_moe_distribute_dispatch
        expand_x, dynamic_scales, assist, _, ep_recv_counts, _, expand_scales = op(**kwargs)

        rows = num_ranks * tokens_cap
        padded = torch.cat([expand_x, expand_x.new_zeros(1, hidden)])
        out: dict[str, torch.Tensor] = {
            "recv_x": padded[layout.pack_row].view(local, rows, hidden),
            "recv_count": layout.recv_count,
            "src_info": layout.src_info,
            "layout_range": layout.layout_range,
        }
        if args.use_fp8:
            scales = torch.cat([dynamic_scales.float().reshape(-1), dynamic_scales.new_zeros(1, dtype=torch.float32)])
            scales = scales[layout.pack_row].view(local, rows)
            used = torch.arange(rows, device=device).unsqueeze(0) < layout.recv_count.unsqueeze(1)
            # The documented rule divides by max|x| with no floor, so an all-zero row gets scale 0 (its q is
            # 0 either way); SPEC 6.2 floors max|x| at 1e-12, so such rows report the SPEC scale. Unused
            # slots read the zero row: SPEC leaves them unspecified and the reference zeroes them too.
            out["recv_scales"] = torch.where(used & (scales == 0), _zero_row_scale(device), scales)
        route = AscendLowLatencyRoute(
            num_tokens=num_tokens,
            capacity=capacity,
            pack_row=layout.pack_row,
            expert_ids=op_ids[rank],
            active_mask=active_mask,
            assist=assist,
            ep_recv_counts=ep_recv_counts,
            expand_scales=expand_scales if limits.expert_scales else None,
            extra={"group_name": group_name, "pass_alg": pass_alg, "limits": limits},
        )
        return out, route, Pending(comm, "low_latency_dispatch", [], [], on_host=device.type == "cpu")

    def _fallback(self, args: LowLatencyDispatchArgs, reason: str) -> tuple[dict, Any, Pending]:
        if os.environ.get(FALLBACK_ENV, "reference").strip().lower() == "raise":
            raise UnsupportedFeatureError(
                f"the Ascend fused low-latency ops cannot serve this call: {reason} "
                f"({FALLBACK_ENV}=raise; unset it to run the reference algorithm instead)"
            )
        _log_once(f"deep_ep ascend: low-latency call runs the reference algorithm on the same group: {reason}")
        return super().low_latency_dispatch(args)

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        route: Any,
        out: torch.Tensor,
    ) -> Pending:
        if isinstance(route, LowLatencyRoute):  # the dispatch ran the reference algorithm
            return super().low_latency_combine(x, topk_idx, topk_weights, route, out)
        npu = vendor.torch_npu()
        comm = self.comm
        num_ranks, rank = comm.size, comm.rank
        local, _, hidden = x.shape
        tokens_cap, num_topk = route.expert_ids.shape
        num_tokens = topk_idx.shape[0]
        limits: ChipLimits = route.extra["limits"]
        packed = x.new_zeros(route.capacity + 1, hidden)
        packed.index_copy_(0, route.pack_row, x.reshape(-1, hidden))  # unused slots all land on the last row
        weights = torch.zeros(tokens_cap, num_topk, dtype=torch.float32, device=x.device)
        weights[:num_tokens] = torch.where(topk_idx >= 0, topk_weights.float(), torch.zeros_like(topk_weights))
        kwargs: dict[str, Any] = dict(
            expand_x=packed[: route.capacity],
            expert_ids=route.expert_ids,
            ep_send_counts=route.ep_recv_counts,
            expert_scales=weights,
            group_ep=route.extra["group_name"],
            ep_world_size=num_ranks,
            ep_rank_id=rank,
            moe_expert_num=local * num_ranks,
            shared_expert_rank_num=0,
            **_shared_expert_num(self.ops),
            global_bs=tokens_cap * num_ranks,
        )
        if self.ops == "v2":
            kwargs["assist_info_for_combine"] = route.assist
            op = npu.npu_moe_distribute_combine_v2
        else:
            kwargs["expand_idx"] = route.assist
            op = npu.npu_moe_distribute_combine
        if route.active_mask is not None:
            kwargs["x_active_mask"] = route.active_mask
        if route.expand_scales is not None:
            kwargs["expand_scales"] = route.expand_scales
        if route.extra["pass_alg"]:
            kwargs["comm_alg"] = limits.comm_alg
        combined = op(**kwargs)[:num_tokens]
        if route.active_mask is not None and route.active_mask.dim() == 2:
            # The op writes only the tokens its mask activates (its output is allocated uninitialised): a token
            # whose K entries are all -1 gets SPEC 6.3's empty sum, +0.0, here.
            selected = route.active_mask[:num_tokens].any(1, keepdim=True)
            combined = torch.where(selected, combined, torch.zeros_like(combined))
        out.copy_(combined)
        return Pending(comm, "low_latency_combine", [], [], on_host=x.device.type == "cpu")


def _shared_expert_num(ops: str) -> dict[str, int]:
    """The shared_expert_num keyword: the v1 ops take only their default (1 on A3, "use the default" on A2;
    shared_expert_rank_num=0 already means no shared expert), the v2 ops take 0."""
    return {"shared_expert_num": 0} if ops == "v2" else {}


def hierarchy_selected() -> bool:
    """Whether the HCCL variables select the A2 'hierarchy' algorithm for ops that are not given comm_alg."""
    return os.environ.get("HCCL_INTRA_PCIE_ENABLE") == "1" and os.environ.get("HCCL_INTRA_ROCE_ENABLE") == "0"


def _zero_row_scale(device: torch.device) -> torch.Tensor:
    """SPEC 6.2's scale of an all-zero row (amax floored at 1e-12), computed by the SPEC cast itself."""
    return quant.per_token_cast_to_int8(torch.zeros(1, 1, device=device))[1].reshape(())


def _has_kwarg(npu: Any, kind: str, ops: str, name: str) -> bool:
    """Whether the installed op takes keyword `name` (older torch_npu builds lack comm_alg, for one)."""
    op_name = f"npu_moe_distribute_{kind}" + ("_v2" if ops == "v2" else "")
    try:
        schema = getattr(torch.ops.npu, op_name).default._schema
        return any(argument.name == name for argument in schema.arguments)
    except Exception:  # noqa: BLE001 - not a registered operator: read the Python callable's signature
        try:
            return name in inspect.signature(getattr(npu, op_name)).parameters
        except (TypeError, ValueError, AttributeError):
            return False
