"""Low-latency mode of the cuda backend: Triton kernels writing into peer memory, no host round trip.

Dispatch: one push kernel writes each token's message once into every rank its experts are on, and flags
the slot of every (token, choice) there; a device barrier; one receive kernel per rank turns its flagged slots
into the SPEC 6 outputs (rows per local expert in source, token order). Combine: one push kernel sends every
received row back into its source rank's `[T*K, H]` area; a barrier; one kernel sums each token's rows in
k order. Four launches per call plus the barriers (an op's last kernel advances its call counter); sizes depend
only on T, H, E, K and R, so the calls are CUDA-graph capturable once the workspace exists. Results are the reference
backend's bit for bit (the same bytes land in the same rows; the combine does the SPEC's fp32 arithmetic).
Kernels: deep_ep/kernels/triton_low_latency.py; design and memory ordering: docs/CUDA.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .. import quant
from ..comm import Pending
from ..kernels import on_device
from .base import LowLatencyDispatchArgs
from .peer_memory import WORD, word_deltas
from .reference_low_latency import _dense

ROW_BLOCK_WORDS = 2048  # words per vector copy step: a 7168-wide bf16 row (1792 words) in one step
# Launch shapes of the row-copy kernels, from the 4xH200 sweeps in docs/results/2026-11-22-h200-session10
# (T=128, H=7168): few warps per program and many programs keep the most rows in flight.
ROW_WARPS = 1  # warps per program (1 and 2 tie on dispatch; 1 is ~1 us faster on combine: run10e, run10f)
PROGRAMS_PER_SM = 16  # receive and combine-push programs per SM (each loops over its rows)
FUSED_CAST_ENV = "DEEP_EP_CUDA_FUSED_CAST"  # "0": make fp8 messages with deep_ep.quant's torch ops instead


@dataclass(frozen=True)
class LowLatencyLayout:
    """Word offsets of the low-latency regions in the workspace for one (R, T, H, E, K); equal on every rank."""

    num_ranks: int
    tokens_cap: int
    hidden: int
    num_experts: int
    num_topk: int

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def rows_per_expert(self) -> int:
        return self.num_ranks * self.tokens_cap

    @property
    def slots(self) -> int:
        return self.experts_per_rank * self.rows_per_expert

    @property
    def pitch(self) -> int:
        """Words per message slot: room for the widest format (bf16), rounded up to 16 bytes."""
        return -(-self.hidden * 2 // 16) * 4

    @property
    def msg_size(self) -> int:
        """Words of one parity's messages: one row per (source rank, token), shared by its local experts."""
        return self.rows_per_expert * self.pitch

    @property
    def flag_base(self) -> int:
        return 2 * self.msg_size

    @property
    def flag_size(self) -> int:
        return -(-2 * self.slots // 4) * 4  # flags then meta, padded to 16 bytes

    @property
    def rows_base(self) -> int:
        return self.flag_base + 2 * self.flag_size

    @property
    def rows_size(self) -> int:
        return self.tokens_cap * self.num_topk * self.hidden // 2

    @property
    def nbytes(self) -> int:
        return (self.rows_base + 2 * self.rows_size) * WORD


@dataclass
class CudaLowLatencyRoute:
    """What combine needs from the dispatch: each received row's count per expert and its way home."""

    layout: LowLatencyLayout
    count: torch.Tensor  # int32 [L]
    target: torch.Tensor  # int32 [L * R*T]: s * T*K + t*K + k


def kernel_refusal(hidden: int, use_fp8: bool, quant_format: str) -> str | None:
    """Why these low-latency sizes need the reference algorithm (the kernels move whole int32 words)."""
    if hidden % 2:
        return f"hidden={hidden} is odd: low-latency kernels need whole 4-byte words per bf16 row"
    if use_fp8 and quant_format == "int8" and hidden % 4:
        return f"hidden={hidden} is not a multiple of 4: int8 low-latency kernels need whole 4-byte words"
    return None


def bf16_words(t: torch.Tensor) -> torch.Tensor:
    """bf16 `t` as int32 words (pairs of columns), copied first where its start or strides do not allow that view
    (`contiguous()` keeps a contiguous tensor 2 bytes off a word, or a one-row view with an odd row stride)."""
    if t.numel() == 0:  # nothing to read; an empty view may still sit at an offset no int32 view takes
        return t.new_empty(*t.shape[:-1], t.shape[-1] // 2, dtype=torch.int32)
    if t.data_ptr() % WORD or t.stride(-1) != 1 or any(stride % 2 for stride in t.stride()[:-1]):
        t = t.clone(memory_format=torch.contiguous_format)
    return t.view(torch.int32)


def message_payload(args: LowLatencyDispatchArgs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """int32 words [N, W] of each token's message body (x bytes then scale bytes), and the quantised fields
    as the reference backend computes them (the same `deep_ep.quant` code, so the same bits)."""
    x = args.x
    if not args.use_fp8:
        return bf16_words(x.contiguous()), {"x": x}
    if args.quant == "int8":
        q, scale = quant.per_token_cast_to_int8(x)
        scale = scale.reshape(-1, 1)
    elif x.is_cuda and x.shape[0] and os.environ.get(FUSED_CAST_ENV, "1") != "0":
        return _fused_fp8_payload(args), {"x": x.new_empty(0, dtype=torch.float8_e4m3fn), "scales": _scales_like(args)}
    else:
        q, scale = quant.per_block_cast_to_fp8(x, round_scale=args.round_scale, use_ue8m0=args.use_ue8m0)
    body = torch.cat([_dense(q).view(torch.uint8), _dense(scale).view(torch.uint8)], dim=1)
    return body.view(torch.int32), {"x": q, "scales": scale}


def _scales_like(args: LowLatencyDispatchArgs) -> torch.Tensor:
    """An empty tensor with the dtype and row width of the fp8 scales (what `empty_outputs` needs to know)."""
    hidden = args.x.shape[1]
    width, dtype = (hidden // 512, torch.int32) if args.use_ue8m0 else (hidden // 128, torch.float32)
    return args.x.new_empty(0, width, dtype=dtype)


def _fused_fp8_payload(args: LowLatencyDispatchArgs) -> torch.Tensor:
    """The fp8 message bodies made by one Triton kernel (SPEC 6.1, the same bits as deep_ep.quant)."""
    from ..kernels.triton_low_latency import ll_fp8_payload_kernel

    x = args.x if args.x.stride(1) == 1 else args.x.contiguous()
    num_tokens, hidden = x.shape
    num_scales = hidden // 128
    scale_words = num_scales // 4 if args.use_ue8m0 else num_scales
    payload = torch.empty(num_tokens, hidden // WORD + scale_words, dtype=torch.int32, device=x.device)
    ll_fp8_payload_kernel[(num_tokens,)](
        x,
        payload.view(torch.uint8),
        payload,
        x.stride(0),
        payload.stride(0),
        quant._INV_FP8_MAX,
        HIDDEN=hidden,
        NUM_SCALES=num_scales,
        BLOCK_SCALES=max(4, _pow2(num_scales)),
        ROUND_SCALE=args.round_scale,
        UE8M0=args.use_ue8m0,
        num_warps=8,
        enable_fp_fusion=False,
    )
    return payload


def empty_outputs(args: LowLatencyDispatchArgs, fields: dict[str, torch.Tensor], layout: LowLatencyLayout) -> dict:
    """SPEC 6 receive tensors, uninitialised (rows past recv_count stay so, as in DeepEP)."""
    experts, rows, device = layout.experts_per_rank, layout.rows_per_expert, args.x.device
    out = {
        "recv_x": torch.empty(experts, rows, layout.hidden, dtype=fields["x"].dtype, device=device),
        "recv_count": torch.empty(experts, dtype=torch.int32, device=device),
        "src_info": torch.empty(experts, rows, dtype=torch.int32, device=device),
        "layout_range": torch.empty(experts, layout.num_ranks, dtype=torch.int64, device=device),
    }
    if "scales" in fields:
        scales = fields["scales"]
        if args.quant == "int8":
            out["recv_scales"] = torch.empty(experts, rows, dtype=scales.dtype, device=device)
        else:  # column-major per expert: [L, S, R*T] transposed
            out["recv_scales"] = torch.empty(
                experts, scales.shape[1], rows, dtype=scales.dtype, device=device
            ).transpose(1, 2)
    return out


class LowLatencyKernels:
    """The low-latency state of one cuda-backend Buffer: its workspace, peer offsets and call counters."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.workspace: Any = None
        self._mapping: tuple[int, int] | None = None  # (local pointer, size) the offsets were computed for
        self._zeroed_for: tuple[tuple[int, int], LowLatencyLayout] | None = None  # (mapping, layout) since the zeroing
        self.peer_delta: torch.Tensor | None = None
        device = backend.device
        # Call counters (their parity picks the workspace half, the dispatch flags hold seq + 1), each with the
        # copy that the op's first kernel leaves for its last one, which advances the counter.
        self.dispatch_seq = torch.zeros(2, dtype=torch.int32, device=device)
        self.combine_seq = torch.zeros(2, dtype=torch.int32, device=device)

    def _device_guard(self) -> Any:
        return on_device(self.backend.device)

    def _ready(self, layout: LowLatencyLayout) -> Any:
        """The workspace, at least `layout.nbytes` big, zeroed since it was allocated or last laid out otherwise
        (collective then: every rank's call has the same layout; a zeroing ends with a barrier)."""
        backend = self.backend
        if self.workspace is None:
            self.workspace = backend._new_workspace("low_latency")
        workspace = self.workspace
        workspace.ensure(layout.nbytes)
        mapping = (workspace.local.data_ptr(), workspace.nbytes)
        if mapping != self._mapping:
            self.peer_delta = word_deltas(workspace, backend.device)
            self._mapping = mapping
        if (mapping, layout) != self._zeroed_for:
            # Fresh memory, or another (R, T, H, E, K): its flags lie where other bytes were (a message, a
            # count), which could equal this call's flag value. Zero it, and let every rank finish zeroing before
            # anyone writes into a peer.
            if backend.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "the low-latency workspace must be zeroed for a new (tokens, hidden, experts, top-k) layout, "
                    "which cannot be captured in a CUDA graph; run the same call once before capturing"
                )
            workspace.local.zero_()
            workspace.barrier(backend.comm.timeout_s)
            self._zeroed_for = (mapping, layout)
        return workspace

    def _parts(self, experts: int, rows: int) -> int:
        """Programs per local expert in the receive and combine-push grids: PROGRAMS_PER_SM per SM in all."""
        device = self.backend.device
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
        return max(1, min(rows, -(-PROGRAMS_PER_SM * sms // max(experts, 1))))

    def dispatch(self, args: LowLatencyDispatchArgs) -> tuple[dict, CudaLowLatencyRoute, Pending]:
        from ..kernels import triton_low_latency as kernels

        backend = self.backend
        num_ranks = backend.comm.size
        num_tokens, hidden = args.x.shape
        num_topk = args.topk_idx.shape[1]
        layout = LowLatencyLayout(num_ranks, args.num_max_dispatch_tokens_per_rank, hidden, args.num_experts, num_topk)
        with self._device_guard():
            workspace = self._ready(layout)
            words = workspace.local.view(torch.int32)
            payload, fields = message_payload(args)
            out = empty_outputs(args, fields, layout)
            experts, rows = layout.experts_per_rank, layout.rows_per_expert
            route = CudaLowLatencyRoute(
                layout,
                torch.empty(experts, dtype=torch.int32, device=backend.device),
                torch.empty(experts * rows, dtype=torch.int32, device=backend.device),
            )
            topk = args.topk_idx.contiguous()
            if num_tokens:
                kernels.ll_dispatch_push_kernel[(num_tokens, num_topk)](
                    payload,
                    topk,
                    words,
                    self.peer_delta,
                    self.dispatch_seq,
                    backend.comm.rank,
                    payload.stride(0),
                    TOKENS_CAP=layout.tokens_cap,
                    EXPERTS_PER_RANK=experts,
                    SLOTS=layout.slots,
                    MSG_SIZE=layout.msg_size,
                    FLAG_BASE=layout.flag_base,
                    FLAG_SIZE=layout.flag_size,
                    PITCH=layout.pitch,
                    WORDS=payload.shape[1],
                    K=num_topk,
                    K_POW2=_pow2(num_topk),
                    **_row_copy(payload.shape[1]),
                )
            else:  # no push kernel to leave the receive kernel its copy of the counter
                self.dispatch_seq[1:].copy_(self.dispatch_seq[:1])

        recv_x = out["recv_x"]
        scales = out.get("recv_scales")
        if scales is not None and scales.dim() == 2:  # int8: one scale per row
            scale_strides = (scales.stride(0), scales.stride(1), 1)
        elif scales is not None:
            scale_strides = scales.stride()
        else:
            scale_strides = (0, 0, 0)
        scale_words = 0 if scales is None else (1 if scales.dim() == 2 else scales.shape[2])
        x_words = recv_x.shape[2] * recv_x.element_size() // WORD

        def receive() -> None:
            with self._device_guard():
                workspace.barrier(backend.comm.timeout_s)
                kernels.ll_dispatch_receive_kernel[(experts, self._parts(experts, rows))](
                    words,
                    self.dispatch_seq,
                    recv_x.view(-1).view(torch.int32) if recv_x.numel() else words,
                    scales.view(torch.int32) if scales is not None else words,
                    out["recv_count"],
                    out["layout_range"],
                    out["src_info"],
                    route.count,
                    route.target,
                    layout.tokens_cap,
                    rows,
                    layout.slots,
                    0,
                    layout.msg_size,
                    layout.flag_base,
                    layout.flag_size,
                    *scale_strides,
                    PITCH=layout.pitch,
                    X_WORDS=x_words,
                    SCALE_WORDS=scale_words,
                    SCALE_BLOCK=_pow2(max(scale_words, 1)),
                    R=num_ranks,
                    K=num_topk,
                    BLOCK_SLOTS=_pow2(rows),
                    **_row_copy(x_words),
                )

        return out, route, Pending(backend.comm, "low_latency_dispatch", [], [receive], on_host=False)

    def combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        route: CudaLowLatencyRoute,
        out: torch.Tensor,
    ) -> Pending:
        from ..kernels import triton_low_latency as kernels

        layout = route.layout
        backend = self.backend
        experts, rows, hidden = x.shape
        with self._device_guard():
            workspace = self._ready(layout)
            words = workspace.local.view(torch.int32)
            x_words = bf16_words(x)
            kernels.ll_combine_push_kernel[(experts, self._parts(experts, rows))](
                x_words if x.numel() else words,
                words,
                self.peer_delta,
                self.combine_seq,
                route.count,
                route.target,
                rows,
                x_words.stride(0),
                x_words.stride(1),
                layout.rows_base,
                layout.rows_size,
                TK=layout.tokens_cap * layout.num_topk,
                H_WORDS=hidden // 2,
                **_row_copy(hidden // 2),
            )
        topk = topk_idx.contiguous()
        weights = topk_weights.contiguous()
        num_tokens = topk.shape[0]

        def reduce() -> None:
            with self._device_guard():
                workspace.barrier(backend.comm.timeout_s)
                target = out if out.stride(1) == 1 else torch.empty_like(out, memory_format=torch.contiguous_format)
                if num_tokens and hidden:
                    block = min(1024, _pow2(hidden))
                    kernels.ll_combine_reduce_kernel[(num_tokens, -(-hidden // block))](
                        workspace.local.view(torch.int16),
                        self.combine_seq,
                        topk,
                        weights,
                        target.view(torch.int16),
                        target.stride(0),
                        hidden,
                        layout.rows_base * 2,
                        layout.rows_size * 2,
                        K=layout.num_topk,
                        BLOCK=block,
                        **_no_fma(backend.device),
                    )
                else:  # no reduce kernel to advance the counter
                    self.combine_seq[:1].add_(1)
                if target is not out:
                    out.copy_(target)

        return Pending(backend.comm, "low_latency_combine", [], [reduce], on_host=False)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _row_copy(words: int) -> dict:
    """Launch options of a kernel that copies rows of `words` int32 words, one vector step per block."""
    block = min(ROW_BLOCK_WORDS, _pow2(words))
    return {"BLOCK": block, "num_warps": max(1, min(ROW_WARPS, block // 128))}  # 128 words: a warp's 16-byte stores


def _no_fma(device: torch.device) -> dict:
    """Launch option that keeps `w * y + acc` as a rounded multiply and a rounded add (SPEC 6.3)."""
    return {"enable_fp_fusion": False} if device.type == "cuda" else {}
