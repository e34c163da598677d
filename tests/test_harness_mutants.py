"""Deliberately broken backends for the harness tests (test_harness_broken.py): subclasses of the reference
backend that each corrupt one thing. Kept apart from the tests, without pytest, so that the rank processes
import only this (they register the backends: registration is per process)."""

from __future__ import annotations

import dataclasses

import torch

import deep_ep
from deep_ep.backends.reference import ReferenceBackend
from deep_ep.packing import RowFormat
from deep_ep.testing import diff


# ---------------------------------------------------------------------------------------------------------
# Broken backends: each corrupts one thing on purpose.
# ---------------------------------------------------------------------------------------------------------
class FlippedBit(ReferenceBackend):
    """Normal dispatch: bit 0 of recv_x[2, 3] flipped on rank 1."""

    name = "broken_flipped_bit"

    def dispatch(self, args):
        out, route, pending = super().dispatch(args)
        if self.comm.rank == 1:

            def flip() -> None:
                out["recv_x"].view(torch.int16)[2, 3] ^= 1

            pending.then(flip)
        return out, route, pending


def _same_source_pair(layout_range: torch.Tensor) -> int | None:
    """First row j of expert 0 such that rows j and j+1 come from the same source rank (None if none)."""
    for packed in layout_range[0].tolist():
        begin, n = packed >> 32, packed & 0xFFFFFFFF
        if n >= 2:
            return begin
    return None


class SwappedRows(ReferenceBackend):
    """Low-latency dispatch: on rank 0 two rows of expert 0 from one source swap places (data and src_info).

    Combine still uses the unswapped route, so the expert outputs of the two tokens are exchanged as well.
    """

    name = "broken_swapped_rows"
    consistent = False  # True: fix the combine route too (a correct backend with another row order)

    def low_latency_dispatch(self, args):
        out, route, pending = super().low_latency_dispatch(args)
        if self.comm.rank != 0:
            return out, route, pending

        def swap() -> None:
            j = _same_source_pair(out["layout_range"])
            if j is None:
                return
            for key in ("recv_x", "recv_scales", "src_info"):
                if key in out:
                    t = out[key]
                    if t.dtype == torch.float8_e4m3fn:  # no float8 indexing kernels on the CPU: move bytes
                        t = t.view(torch.uint8)
                    t[0, [j, j + 1]] = t[0, [j + 1, j]].clone()
            if self.consistent:  # combine slots point at flat rows (expert * R*T + row): follow the swap
                slots = route.slot_rows
                a, b = slots == j, slots == j + 1
                slots[a], slots[b] = j + 1, j

        pending.then(swap)
        return out, route, pending


class ReorderedRows(SwappedRows):
    """A correct backend whose rows within an expert come in another order, and which says so."""

    name = "reordered_rows"
    consistent = True
    features = ReferenceBackend.features | {diff.UNORDERED_FEATURE}


class ReorderedRowsClaimingSpecOrder(SwappedRows):
    """The same correct reordering, but the backend does not declare it: it claims SPEC 6 order."""

    name = "reordered_rows_claiming_spec_order"
    consistent = True


class WrongReductionOrder(ReferenceBackend):
    """Normal combine: the returned rows are summed by destination rank descending (SPEC 5: ascending)."""

    name = "broken_reduction_order"

    def combine(self, x, route, topk_weights, bias):
        fmt = RowFormat.of(x=x, topk_weights=topk_weights)
        returned, pending = route.backward(self.comm, fmt.pack(x=x, topk_weights=topk_weights), "combine")
        combined_x = x.new_empty(route.num_tokens, *x.shape[1:])
        combined_w = None if topk_weights is None else topk_weights.new_empty(route.num_tokens, topk_weights.shape[1])

        def reduce() -> None:
            fields = fmt.unpack(returned)
            combined_x.copy_(_descending_sum(route, fields["x"], bias))
            if combined_w is not None:
                combined_w.copy_(_descending_sum(route, fields["topk_weights"], ()))

        return combined_x, combined_w, pending.then(reduce)


def _descending_sum(route, rows: torch.Tensor, bias) -> torch.Tensor:
    acc = torch.zeros(route.num_tokens + 1, *rows.shape[1:], dtype=torch.float32)
    for b in bias:
        acc[: route.num_tokens] += b.float()
    for begin, end in reversed(list(route.destination_blocks())):
        acc.index_add_(0, route.send_tokens[begin:end], rows[begin:end].float())
    return acc[: route.num_tokens].to(rows.dtype)


class OffByOneRecvCount(ReferenceBackend):
    """Low-latency dispatch: recv_count[0] one too high on rank 1."""

    name = "broken_recv_count"

    def low_latency_dispatch(self, args):
        out, route, pending = super().low_latency_dispatch(args)
        if self.comm.rank == 1:
            pending.then(lambda: out["recv_count"][0:1].add_(1))
        return out, route, pending


class OffByOneExpertList(ReferenceBackend):
    """Normal dispatch: the last entry of num_recv_tokens_per_expert_list one too high on rank 0."""

    name = "broken_expert_list"

    def dispatch(self, args):
        out, route, pending = super().dispatch(args)
        if self.comm.rank == 0 and out["num_recv_tokens_per_expert_list"]:
            out["num_recv_tokens_per_expert_list"][-1] += 1
        return out, route, pending


class DroppedMinusOneRule(ReferenceBackend):
    """get_dispatch_layout forgets that -1 means "no expert": -1 indexes the last expert, Python style."""

    name = "broken_minus_one"

    def get_dispatch_layout(self, topk_idx, num_experts):
        return super().get_dispatch_layout(torch.where(topk_idx < 0, num_experts - 1, topk_idx), num_experts)


class Int8OffBy(ReferenceBackend):
    """Low-latency int8 dispatch: recv_x[0, 0, 0] on rank 0 off by `delta` quantisation steps."""

    name = "int8_off_by_one"
    delta = 1

    def low_latency_dispatch(self, args):
        out, route, pending = super().low_latency_dispatch(args)
        if self.comm.rank == 0:

            def nudge() -> None:
                q = out["recv_x"]
                if q.dtype != torch.int8:
                    return
                step = self.delta if int(q[0, 0, 0]) < 0 else -self.delta  # stay inside [-127, 127]
                q[0, 0, 0] += step

            pending.then(nudge)
        return out, route, pending


class Int8OffByTwo(Int8OffBy):
    name = "int8_off_by_two"
    delta = 2


class ShortLayoutRange(ReferenceBackend):
    """Declares another low-latency row order, and returns a layout_range one expert short ([L - 1, R])."""

    name = "broken_short_layout_range"
    features = ReferenceBackend.features | {diff.UNORDERED_FEATURE}

    def low_latency_dispatch(self, args):
        out, route, pending = super().low_latency_dispatch(args)

        def cut() -> None:
            t = out["layout_range"]
            t.set_(t[:-1].clone())  # the same tensor object, which the handle holds

        pending.then(cut)
        return out, route, pending


class AbsWeightsCombine(ReferenceBackend):
    """Normal combine reduces |topk_weights|: right only while every weight is positive."""

    name = "broken_abs_weights"

    def combine(self, x, route, topk_weights, bias):
        return super().combine(x, route, None if topk_weights is None else topk_weights.abs(), bias)


class AbsWeightsLowLatency(ReferenceBackend):
    """Low-latency combine weights the rows by |w|."""

    name = "broken_abs_weights_ll"

    def low_latency_combine(self, x, topk_idx, topk_weights, route, out):
        return super().low_latency_combine(x, topk_idx, topk_weights.abs(), route, out)


class CachedScalesZero(ReferenceBackend):
    """Cached dispatch of a (values, scales) tuple: the received scales are zero."""

    name = "broken_cached_scales"

    def cached_dispatch(self, x, x_scales, route):
        recv, scales, pending = super().cached_dispatch(x, x_scales, route)
        if scales is not None:
            pending.then(scales.zero_)
        return recv, scales, pending


class IgnoresWorstTokens(ReferenceBackend):
    """Dispatch ignores num_worst_tokens: no padding, and the count list of a plain dispatch."""

    name = "broken_ignores_worst"

    def dispatch(self, args):
        return super().dispatch(dataclasses.replace(args, num_worst_tokens=0))


class NoTopkZeroCounts(ReferenceBackend):
    """Dispatch without topk_idx: num_recv_tokens_per_expert_list all zero (as if counted from topk_idx)."""

    name = "broken_no_topk_counts"

    def dispatch(self, args):
        out, route, pending = super().dispatch(args)
        if args.topk_idx is None:
            out["num_recv_tokens_per_expert_list"] = [0] * len(out["num_recv_tokens_per_expert_list"])
        return out, route, pending


class TensorCounts(ReferenceBackend):
    """num_recv_tokens_per_expert_list as an int64 tensor of the right values (DeepEP: a list of int)."""

    name = "broken_tensor_counts"

    def dispatch(self, args):
        out, route, pending = super().dispatch(args)
        out["num_recv_tokens_per_expert_list"] = torch.tensor(out["num_recv_tokens_per_expert_list"])
        return out, route, pending


BROKEN = [
    FlippedBit,
    SwappedRows,
    ReorderedRows,
    ReorderedRowsClaimingSpecOrder,
    WrongReductionOrder,
    OffByOneRecvCount,
    OffByOneExpertList,
    DroppedMinusOneRule,
    Int8OffBy,
    Int8OffByTwo,
    ShortLayoutRange,
    AbsWeightsCombine,
    AbsWeightsLowLatency,
    CachedScalesZero,
    IgnoresWorstTokens,
    NoTopkZeroCounts,
    TensorCounts,
]


def register_broken_backends() -> None:
    """The plan's setup: runs in every rank process (registration is per process)."""
    for cls in BROKEN:
        deep_ep.register_backend(cls.name, cls)


def test_mutants_are_reference_backends_with_their_own_names() -> None:
    assert len({cls.name for cls in BROKEN}) == len(BROKEN)
    assert all(issubclass(cls, ReferenceBackend) and cls.name != "reference" for cls in BROKEN)
    assert ReorderedRows.supports(diff.UNORDERED_FEATURE) and not SwappedRows.supports(diff.UNORDERED_FEATURE)
