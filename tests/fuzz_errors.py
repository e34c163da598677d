"""A randomised error-path fuzzer for `deep_ep.Buffer` (docs/ERRORS.md, SPEC 8).

On a gloo world of 2-3 ranks, for one backend (`reference`, or `cuda_sim`: the cuda backend on emulated symmetric
memory with Triton's interpreter), each seed draws a small workload and then runs steps. A step runs a valid random
round (fresh dispatch, cached dispatch, combine, or a low-latency pair, with random valid edge inputs: odd strides,
int32 ids, int64 counts, an older handle, `num_worst_tokens`, a config) and compares it with the executable spec
(`reference/`) bit for bit; then it picks an operation, a corruption and the ranks that apply it (one rank, or
all), and checks that

1. every rank raises (a `ValueError`, `TypeError` or `UnsupportedFeatureError`; a `CommTimeoutError`, a rank that
   returns normally, or a hang is a finding), except that a local call (`get_dispatch_layout`) raises only where
   it is spoiled;
2. a spoiled rank's message names the bad argument (the agreement field, for arguments that must match across
   ranks: every rank's `CollectiveMismatchError` names it);
3. the next valid round on the same Buffer still matches the spec bit for bit.

Run as a script: `python tests/fuzz_errors.py --seeds 0:40 --worlds 2 3 --backends reference cuda_sim`.
`tests/test_fuzz_errors.py` runs a small fixed slice of it.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import reference
from deep_ep import Buffer, CollectiveMismatchError, CommTimeoutError, Config, UnsupportedFeatureError
from deep_ep.testing import run_ranks
from deep_ep.testing.compare import first_mismatch
from deep_ep.testing.workloads import make_workload

_X_DTYPES = (torch.float32, torch.float16, torch.float64, torch.int8, torch.bool, torch.float8_e4m3fn, torch.int64)
_COMBINE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the executable spec's
COMM_TIMEOUT_S = 15.0  # a rank left waiting raises CommTimeoutError after this: a finding, not a hang
EXPECTED = (ValueError, TypeError, UnsupportedFeatureError)  # CollectiveMismatchError is a ValueError


# ---- one seed's workload and its executable-spec results ------------------------------------------------------
@dataclass
class Case:
    """Every rank's inputs for one seed (drawn alike on every rank) and the spec's answers, computed lazily."""

    world: int
    rank: int
    experts: int
    cap: int  # T of low-latency mode
    w: Any  # deep_ep.testing.workloads.Workload
    cache: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # what the last valid rounds left: handles, received rows

    @property
    def x(self) -> torch.Tensor:
        return self.w.x[self.rank]

    @property
    def idx(self) -> torch.Tensor:
        return self.w.topk_idx[self.rank]

    @property
    def weights(self) -> torch.Tensor:
        return self.w.topk_weights[self.rank]

    def layout(self) -> list[dict]:
        if "layout" not in self.cache:
            self.cache["layout"] = reference.layout(self.w.topk_idx, self.experts)
        return self.cache["layout"]

    def in_ranks(self) -> list[torch.Tensor]:
        return [q["is_token_in_rank"] for q in self.layout()]

    def dispatch_spec(
        self, alignment: int, worst: int, channels: int, dtype: torch.dtype = torch.bfloat16
    ) -> list[dict]:
        key = ("dispatch", alignment, worst, channels, dtype)
        if key not in self.cache:
            per_expert = [q["num_tokens_per_expert"] for q in self.layout()]
            self.cache[key] = reference.dispatch(
                [x.to(dtype) for x in self.w.x], self.in_ranks(), per_expert, self.w.topk_idx, self.w.topk_weights,
                self.experts,
                expert_alignment=alignment, num_worst_tokens=worst, num_channels=channels,
            )  # fmt: skip
        return self.cache[key]

    def ll_spec(self) -> list[dict]:
        if "ll" not in self.cache:
            self.cache["ll"] = reference.low_latency_dispatch(
                self.w.x, self.w.topk_idx, self.cap, self.experts, use_fp8=False
            )
        return self.cache["ll"]


def draw_case(rng: random.Random, rank: int, world: int, seed: int) -> Case:
    """A small workload; the same on every rank (each rank draws every rank's inputs from `rng`)."""
    experts = rng.randint(1, 3) * world
    topk = rng.randint(1, min(3, experts))
    tokens = [rng.randint(0, 6) for _ in range(world)]
    hidden = rng.choice([1, 7, 8, 16, 128])
    routing = rng.choice(["uniform", "sparse", "idle_rank", "skewed"])
    w = make_workload(world, tokens, hidden, topk, experts, seed=seed, routing=routing)
    return Case(world, rank, experts, max(tokens) + rng.randint(1, 2), w)


# ---- valid rounds: random valid edge inputs, compared with the spec ----------------------------------------------
def _odd_strides(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values with other strides: columns of a wider tensor, column-major, or at an odd offset; or
    "expanded": every row is row 0 (stride 0: other values, for the inputs that are only read)."""
    if t.dim() != 2 or t.numel() == 0:
        return t
    if how == "expanded":
        return t[:1].expand(t.shape)
    if how == "wide":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if how == "column":
        return t.t().contiguous().t()
    if how == "offset":
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype)
        return flat[1:].view(t.shape).copy_(t)
    return t


def _differ(name: str, got: Any, want: Any) -> str | None:
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{name}: got {type(got).__name__}"
        problem = first_mismatch(got, want)
        return f"{name}: {problem}" if problem else None
    return None if got == want else f"{name}: {got!r} != {want!r}"


class Rig:
    """One rank's Buffers and what the last valid rounds left behind (handles, received rows)."""

    def __init__(self, rank: int, world: int, backend: str) -> None:
        self.rank, self.world, self.backend = rank, world, backend
        self.buffer = Buffer(dist.group.WORLD, 1024, low_latency_mode=True, backend=backend)
        self.other = Buffer(dist.group.WORLD, low_latency_mode=True, backend=backend)
        for b in (self.buffer, self.other):
            b.comm_timeout = COMM_TIMEOUT_S
        self.case: Case | None = None
        self.foreign: dict[str, Any] = {}

    @property
    def state(self) -> dict[str, Any]:
        return self.case.state

    def new_case(self, case: Case) -> None:
        self.case = c = case
        # Handles from another Buffer, for the corruptions that pass them.
        lay = c.layout()[c.rank]
        self.foreign["normal"] = self.other.dispatch(
            c.x, num_tokens_per_rank=lay["num_tokens_per_rank"], is_token_in_rank=lay["is_token_in_rank"],
            num_tokens_per_expert=lay["num_tokens_per_expert"],
        )[4]  # fmt: skip
        self.foreign["ll"] = self.other.low_latency_dispatch(c.x, c.idx, c.cap, c.experts, use_fp8=False)[2]

    # The valid rounds. Each returns a list of problems (empty: bit-identical to the spec).
    def fresh(self, rng: random.Random) -> list[str]:
        c = self.case
        per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(c.idx, np.int64(c.experts))
        x, idx, weights = c.x, c.idx, c.weights
        variant = rng.choice(["plain", "wide", "column", "offset", "int32", "int64_counts", "worst", "config", "grad"])
        alignment, worst, config, channels = rng.choice([1, 1, 2, 5]), 0, None, 10
        dtype = rng.choice([torch.bfloat16] * 4 + list(_X_DTYPES))  # x may have any dtype
        x = x.to(dtype)
        if variant == "grad" and dtype.is_floating_point and dtype.itemsize > 1:
            x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
        elif variant in ("wide", "column", "offset"):
            x, idx, weights = (_odd_strides(t, variant) for t in (x, idx, weights))
            in_rank = _odd_strides(in_rank, variant)
        elif variant == "int32":
            idx = idx.int()
        elif variant == "int64_counts":
            per_rank, per_expert = per_rank.long(), per_expert.long()
        elif variant == "worst":
            spec = c.dispatch_spec(1, 0, 10)
            worst = max(s["recv_x"].shape[0] for s in spec) + rng.randint(0, 3)
        elif variant == "config":
            config = Config(num_sms=rng.choice([2, 4, 7, 24]))
            channels = config.num_sms // 2
        later = rng.random() < 0.3  # async_finish, its event waited only after the next (corrupted) call
        out = self.buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idx, topk_weights=weights, expert_alignment=alignment, num_worst_tokens=worst, config=config,
            async_finish=later,
        )  # fmt: skip
        recv_x, recv_idx, recv_w, counts, handle, event = out
        want = c.dispatch_spec(alignment, worst, channels, dtype)[c.rank]
        want_idx = want["recv_topk_idx"].to(idx.dtype)
        if "normal" in self.state:
            self.state["old_normal"] = self.state["normal"]
        self.state["normal"] = dict(
            handle=handle, recv_x=recv_x, recv_w=recv_w, worst=worst, channels=channels, event=event, dtype=dtype
        )

        def check() -> list[str]:
            event.current_stream_wait()
            return self._fresh_problems(f"{variant}, {dtype}", out, want, want_idx)

        if later:
            self.state.setdefault("deferred", []).append(check)
            return []
        return check()

    def _fresh_problems(self, variant: str, out: tuple, want: dict, want_idx: torch.Tensor) -> list[str]:
        recv_x, recv_idx, recv_w, counts, handle, _ = out
        problems = [
            _differ("recv_x", recv_x, want["recv_x"]),
            _differ("recv_topk_idx", recv_idx, want_idx),
            _differ("recv_topk_weights", recv_w, want["recv_topk_weights"]),
            _differ("num_recv_tokens_per_expert_list", counts, want["num_recv_tokens_per_expert_list"]),
            _differ("recv_src_idx", handle[3], want["recv_src_idx"]),
            _differ("rank_prefix_matrix", handle[0], want["rank_prefix_matrix"]),
        ]
        return [f"fresh dispatch ({variant}): {p}" for p in problems if p]

    def received(self, key: str = "normal") -> dict[str, Any]:
        """A dispatch's state, its outputs complete (an async dispatch's event waited on: reading them before is a
        caller's error)."""
        st = self.state[key]
        st["event"].current_stream_wait()
        return st

    def cached(self, rng: random.Random) -> list[str]:
        c = self.case
        if "normal" not in self.state:
            return self.fresh(rng)
        older = "old_normal" in self.state and rng.random() < 0.3  # an older handle of this Buffer is valid too
        st = self.state["old_normal" if older else "normal"]
        dtype = rng.choice([torch.bfloat16] * 2 + list(_X_DTYPES))  # any dtype, not the handle's dispatch's only
        how = rng.choice(["plain", "wide", "column", "offset", "expanded"])
        x = _odd_strides((c.x * 2).to(dtype), how)
        got = self.buffer.dispatch(x, handle=st["handle"], num_worst_tokens=rng.choice([0, st["worst"]]))[0]
        xs = [_odd_strides((t * 2).to(dtype), how) for t in c.w.x]
        want = reference.cached_dispatch(xs, c.in_ranks(), st["worst"])[c.rank]
        problem = _differ("recv_x", got, want)
        return [f"cached dispatch ({dtype}, {how}, older={older}): {problem}"] if problem else []

    def combine(self, rng: random.Random) -> list[str]:
        c = self.case
        if "normal" not in self.state:
            self.fresh(rng)
        st = self.received()
        with_weights = rng.random() < 0.7
        # The combine's hidden need not be the dispatch's (an expert may change the width); biases are optional.
        wider, with_bias = rng.random() < 0.3, rng.random() < 0.4

        def rows(t: torch.Tensor) -> torch.Tensor:
            t = t if t.dtype in _COMBINE_DTYPES else t.to(torch.bfloat16)
            return torch.cat([t, t * 0.5], 1) if wider else t

        how = rng.choice(["plain", "wide", "offset", "expanded"])
        x = _odd_strides(rows(st["recv_x"]), how)
        bias = None
        if with_bias:
            bias = (None, _odd_strides(rows(c.x.to(st["dtype"])) * 0.25, rng.choice(["plain", "wide", "column"])))
        weights = _odd_strides(st["recv_w"], rng.choice(["plain", "wide"])) if with_weights else None
        got, got_w, _ = self.buffer.combine(x, st["handle"], topk_weights=weights, bias=bias)
        spec = c.dispatch_spec(1, st["worst"], st["channels"], st["dtype"])
        want = reference.combine(
            [_odd_strides(rows(s["recv_x"]), how) for s in spec],
            c.in_ranks(),
            [s["recv_topk_weights"] for s in spec] if with_weights else None,
            [rows(x.to(st["dtype"])) * 0.25 for x in c.w.x] if with_bias else None,
        )[c.rank]
        problems = [_differ("combined_x", got, want["combined_x"])]
        if with_weights:
            problems.append(_differ("combined_topk_weights", got_w, want["combined_topk_weights"]))
        variant = f"{how} wider={wider} bias={with_bias} weights={with_weights}"
        return [f"combine ({variant}): {p}" for p in problems if p]

    def low_latency(self, rng: random.Random) -> list[str]:
        c = self.case
        idx = c.idx.int() if rng.random() < 0.3 else c.idx
        stats = torch.zeros(c.experts // c.world, dtype=torch.int32)
        recv, count, handle, _, hook = self.buffer.low_latency_dispatch(
            _odd_strides(c.x, rng.choice(["plain", "offset", "column", "wide"])), idx, c.cap, c.experts,
            cumulative_local_expert_recv_stats=stats, use_fp8=False, return_recv_hook=rng.random() < 0.3,
        )  # fmt: skip
        if hook is not None:
            hook()
        spec = c.ll_spec()
        want = spec[c.rank]
        problems = [_differ("recv_count", count, want["recv_count"]), _differ("stats", stats, want["recv_count"])]
        for e, n in enumerate(want["recv_count"].tolist()):
            problems.append(_differ(f"recv_x[{e}]", recv[e, :n], want["recv_x"][e, :n]))
        if "ll" in self.state:
            self.state["old_ll"] = self.state["ll"]
        self.state["ll"] = dict(handle=handle, recv=recv, idx=idx)
        want_c = reference.low_latency_combine([s["recv_x"] for s in spec], c.w.topk_idx, c.w.topk_weights, c.cap)
        if rng.random() < 0.25:  # another dispatch in between: the combine uses the older handle, still valid
            self.buffer.low_latency_dispatch(c.x, c.idx, c.cap, c.experts, use_fp8=False)
        out = None
        if rng.random() < 0.4:  # a caller's output tensor, maybe strided
            out = _odd_strides(torch.zeros(c.x.shape, dtype=torch.bfloat16), rng.choice(["plain", "wide", "offset"]))
        x = _odd_strides(recv, rng.choice(["plain", "offset"]))
        weights = _odd_strides(c.weights, rng.choice(["plain", "wide", "column"]))
        later = rng.random() < 0.3  # async_finish, its event waited only after the next (corrupted) call
        combined, event, _ = self.buffer.low_latency_combine(x, idx, weights, handle, out=out, async_finish=later)

        def check() -> list[str]:
            event.current_stream_wait()
            more = [_differ("combined", combined, want_c[c.rank])]
            if out is not None:
                more.append(_differ("out", out, want_c[c.rank]) if combined is out else "combined is not out")
            return [f"low-latency combine: {p}" for p in more if p]

        if later:
            self.state.setdefault("deferred", []).append(check)
        else:
            problems += check()
        return [f"low-latency: {p}" for p in problems if p]

    def deferred(self) -> list[str]:
        """The checks of async calls whose events were left for after the corrupted call."""
        checks, self.state["deferred"] = self.state.get("deferred", []), []
        return [p for check in checks for p in check()]

    def valid_round(self, rng: random.Random, op: str | None = None) -> list[str]:
        op = op or rng.choice(["fresh", "cached", "combine", "low_latency"])
        return getattr(self, op)(rng)


# ---- corruptions ---------------------------------------------------------------------------------------------------
Args = dict[str, Any]


@dataclass(frozen=True)
class Corruption:
    """One way to spoil one call. `spoil(rig, args)` edits the call's keyword arguments on a spoiled rank.
    `names`: the message of a spoiled rank contains one of them. `kind`: "own" (spoiled ranks raise their own
    error, the others any documented error), "mismatch" (valid on its own but not across ranks: one rank only, and
    every rank's CollectiveMismatchError names it), "one" (as "own", but valid when every rank does it: one rank
    only), "all" (spoil every rank) or "local" (no communication: only spoiled ranks raise).
    `needs(case, rank)`: whether the corruption applies to that rank's inputs."""

    op: str
    name: str
    spoil: Callable[[Rig, Args], None]
    names: tuple[str, ...]
    kind: str = "own"
    needs: Callable[[Case, int], bool] = lambda case, rank: True


def _tokens(case: Case, rank: int) -> bool:
    return case.w.x[rank].shape[0] > 0


def _picked(case: Case, rank: int) -> bool:
    return bool((case.w.topk_idx[rank] >= 0).any())


def _set(name: str, value: Callable[[Rig, Args], Any]) -> Callable[[Rig, Args], None]:
    def spoil(rig: Rig, args: Args) -> None:
        args[name] = value(rig, args)

    return spoil


def _with_entry(value: Callable[[torch.Tensor, Case], int]) -> Callable[[Rig, Args], Any]:
    """topk_idx with entry [0, 0] replaced."""

    def make(rig: Rig, args: Args) -> torch.Tensor:
        idx = args["topk_idx"].clone()
        idx[0, 0] = value(idx, rig.case)
        return idx

    return make


def _duplicate(rig: Rig, args: Args) -> torch.Tensor:
    idx = args["topk_idx"].clone()
    first = int(idx[0, 0]) if int(idx[0, 0]) >= 0 else 0
    idx[0, :2] = first
    return idx


def _another_id(rig: Rig, args: Args) -> torch.Tensor:
    """The dispatched ids with one valid entry replaced by an id the token did not select (or by -1)."""
    idx = args["topk_idx"].clone()
    t, k = (int(i) for i in (idx >= 0).nonzero()[0])
    unused = sorted(set(range(rig.case.experts)) - set(idx[t].tolist()))
    idx[t, k] = unused[0] if unused else -1
    return idx


def _another_float(t: torch.Tensor) -> torch.dtype:
    return torch.float16 if t.dtype == torch.float32 else torch.float32


def _rows_plus_one(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(1, *t.shape[1:])])


def _half_hidden(x: torch.Tensor) -> torch.Tensor:
    return x[..., : x.shape[-1] // 2].contiguous()


def _too_many(rig: Rig, args: Args) -> None:
    """N = T + 1 tokens, each selecting nothing."""
    c = rig.case
    args["x"] = torch.zeros(c.cap + 1, c.w.hidden, dtype=torch.bfloat16)
    args["topk_idx"] = torch.full((c.cap + 1, c.w.num_topk), -1, dtype=torch.long)


def _older(key: str) -> Callable[[Rig, Args], Any]:
    return lambda rig, args: rig.state[f"old_{key}"]["handle"]


def _has_older(key: str) -> Callable[[Case, int], bool]:
    return lambda case, rank: f"old_{key}" in case.state  # filled alike on every rank


def _need_worst(case: Case, rank: int) -> bool:
    return max(s["recv_x"].shape[0] for s in case.dispatch_spec(1, 0, 10)) > 1


def _hidden_not_128(case: Case, rank: int) -> bool:
    return case.w.hidden % 128 != 0


def _hidden_128(case: Case, rank: int) -> bool:
    return case.w.hidden % 128 == 0


def _many_topk(case: Case, rank: int) -> bool:
    return case.w.num_topk >= 2


def _multi(case: Case, rank: int) -> bool:
    return case.world > 1


def _halves(case: Case, rank: int) -> bool:
    return case.world > 1 and case.w.hidden > 1


def _table() -> list[Corruption]:
    C = Corruption
    idx_high = _with_entry(lambda idx, c: c.experts)
    idx_low = _with_entry(lambda idx, c: -2)
    float_idx = _set("topk_idx", lambda r, a: a["topk_idx"].float())
    flat_idx = _set("topk_idx", lambda r, a: a["topk_idx"].reshape(-1))
    list_idx = _set("topk_idx", lambda r, a: a["topk_idx"].tolist())
    x_1d = _set("x", lambda r, a: a["x"].reshape(-1))
    x_list = _set("x", lambda r, a: a["x"].tolist())
    x_no_cols = _set("x", lambda r, a: a["x"][:, :0])
    x_rows = _set("x", lambda r, a: _rows_plus_one(a["x"]))
    x_hidden = _set("x", lambda r, a: _half_hidden(a["x"]))
    bad_event = _set("previous_event", lambda r, a: "event")
    table = [
        # get_dispatch_layout: local, only the spoiled rank raises
        C("layout", "idx-float", float_idx, ("topk_idx",), "local"),
        C("layout", "idx-1d", flat_idx, ("topk_idx",), "local"),
        C("layout", "idx-list", list_idx, ("topk_idx",), "local"),
        C("layout", "idx-high", _set("topk_idx", idx_high), ("topk_idx",), "local", _tokens),
        C("layout", "idx-low", _set("topk_idx", idx_low), ("topk_idx",), "local", _tokens),
        C("layout", "experts-indivisible", _set("num_experts", lambda r, a: a["num_experts"] + 1), ("num_experts",),
          "local", _multi),
        C("layout", "experts-zero", _set("num_experts", lambda r, a: 0), ("num_experts",), "local"),
        C("layout", "experts-float", _set("num_experts", lambda r, a: float(a["num_experts"])), ("num_experts",),
          "local"),
        C("layout", "event", bad_event, ("previous_event",), "local"),
        C("layout", "async-str", _set("async_finish", lambda r, a: "no"), ("async_finish",), "local"),
        # local calls beside the collectives
        C("clean", "cap-zero", _set("num_max_dispatch_tokens_per_rank", lambda r, a: 0),
          ("num_max_dispatch_tokens_per_rank",), "local"),
        C("clean", "hidden-str", _set("hidden", lambda r, a: "8"), ("hidden",), "local"),
        C("clean", "experts-indivisible", _set("num_experts", lambda r, a: a["num_experts"] + 1), ("num_experts",),
          "local", _multi),
        C("local_buffer", "dtype-str", _set("dtype", lambda r, a: "bf16"), ("dtype",), "local"),
        C("local_buffer", "size-negative", _set("size", lambda r, a: (-1,)), ("size",), "local"),
        C("local_buffer", "size-int", _set("size", lambda r, a: 4), ("size",), "local"),
        C("local_buffer", "size-large", _set("size", lambda r, a: (4096,)), ("size",), "local"),
        C("local_buffer", "offset-odd", _set("offset", lambda r, a: 3), ("offset",), "local"),
        C("local_buffer", "offset-float", _set("offset", lambda r, a: 2.0), ("offset",), "local"),
        C("next_buffer", "handle-normal", _set("handle", lambda r, a: r.foreign["normal"]), ("handle",), "local"),
        C("next_buffer", "handle-foreign", _set("handle", lambda r, a: r.state["ll"]["handle"]), ("handle",),
          "local"),
        # dispatch (fresh)
        C("dispatch", "x-1d", x_1d, ("x",)),
        C("dispatch", "x-list", x_list, ("x",)),
        C("dispatch", "x-triple", _set("x", lambda r, a: (a["x"], a["x"], a["x"])), ("x",)),
        C("dispatch", "x-no-cols", x_no_cols, ("x.shape[1]",)),
        C("dispatch", "x-rows", x_rows, ("x", "is_token_in_rank")),
        C("dispatch", "scales-rows", _set("x", lambda r, a: (a["x"], torch.ones(a["x"].shape[0] + 1))), ("x_scales",)),
        C("dispatch", "idx-float", float_idx, ("topk_idx",)),
        C("dispatch", "idx-rows", _set("topk_idx", lambda r, a: _rows_plus_one(a["topk_idx"])), ("topk_idx",)),
        C("dispatch", "idx-high", _set("topk_idx", idx_high), ("topk_idx",), "own", _tokens),
        C("dispatch", "idx-low", _set("topk_idx", idx_low), ("topk_idx",), "own", _tokens),
        C("dispatch", "idx-alone", _set("topk_weights", lambda r, a: None), ("topk_weights",)),
        C("dispatch", "weights-alone", _set("topk_idx", lambda r, a: None), ("topk_idx",)),
        C("dispatch", "weights-half", _set("topk_weights", lambda r, a: a["topk_weights"].half()), ("topk_weights",)),
        C("dispatch", "weights-cols", _set("topk_weights", lambda r, a: torch.ones(a["x"].shape[0], 9)),
          ("topk_weights",)),
        C("dispatch", "weights-1d", _set("topk_weights", lambda r, a: a["topk_weights"].reshape(-1)),
          ("topk_weights",)),
        C("dispatch", "per-rank-float", _set("num_tokens_per_rank", lambda r, a: a["num_tokens_per_rank"].float()),
          ("num_tokens_per_rank",)),
        C("dispatch", "per-rank-values", _set("num_tokens_per_rank", lambda r, a: a["num_tokens_per_rank"] + 1),
          ("num_tokens_per_rank",)),
        C("dispatch", "per-rank-shape", _set("num_tokens_per_rank", lambda r, a: _rows_plus_one(
            a["num_tokens_per_rank"])), ("num_tokens_per_rank",)),
        C("dispatch", "per-rank-none", _set("num_tokens_per_rank", lambda r, a: None), ("num_tokens_per_rank",)),
        C("dispatch", "in-rank-int", _set("is_token_in_rank", lambda r, a: a["is_token_in_rank"].int()),
          ("is_token_in_rank",)),
        C("dispatch", "in-rank-rows", _set("is_token_in_rank", lambda r, a: _rows_plus_one(a["is_token_in_rank"])),
          ("is_token_in_rank",)),
        C("dispatch", "in-rank-list", _set("is_token_in_rank", lambda r, a: a["is_token_in_rank"].tolist()),
          ("is_token_in_rank",)),
        C("dispatch", "per-expert-odd", _set("num_tokens_per_expert", lambda r, a: _rows_plus_one(
            a["num_tokens_per_expert"])), ("num_tokens_per_expert",), "own", _multi),
        C("dispatch", "per-expert-float", _set("num_tokens_per_expert", lambda r, a: a["num_tokens_per_expert"]
          .float()), ("num_tokens_per_expert",)),
        C("dispatch", "per-expert-2d", _set("num_tokens_per_expert", lambda r, a: a["num_tokens_per_expert"]
          .view(1, -1)), ("num_tokens_per_expert",)),
        C("dispatch", "rdma-shape", _set("num_tokens_per_rdma_rank", lambda r, a: torch.zeros(2, dtype=torch.int32)),
          ("num_tokens_per_rdma_rank",)),
        C("dispatch", "alignment-zero", _set("expert_alignment", lambda r, a: 0), ("expert_alignment",)),
        C("dispatch", "alignment-float", _set("expert_alignment", lambda r, a: 2.0), ("expert_alignment",)),
        C("dispatch", "alignment-str", _set("expert_alignment", lambda r, a: "2"), ("expert_alignment",)),
        C("dispatch", "worst-negative", _set("num_worst_tokens", lambda r, a: -1), ("num_worst_tokens",)),
        C("dispatch", "worst-float", _set("num_worst_tokens", lambda r, a: 64.0), ("num_worst_tokens",)),
        C("dispatch", "worst-small", _set("num_worst_tokens", lambda r, a: 1), ("num_worst_tokens",), "all",
          _need_worst),
        C("dispatch", "config-sms", _set("config", lambda r, a: Config(num_sms=0)), ("num_sms",)),
        C("dispatch", "config-type", _set("config", lambda r, a: {"num_sms": 20}), ("config",)),
        C("dispatch", "event", bad_event, ("previous_event",)),
        C("dispatch", "async-str", _set("async_finish", lambda r, a: "no"), ("async_finish",)),
        C("dispatch", "comm-stream", _set("allocate_on_comm_stream", lambda r, a: True), ("allocate_on_comm_stream",)),
        C("dispatch", "hidden", x_hidden, ("hidden",), "mismatch", _halves),
        C("dispatch", "x-dtype", _set("x", lambda r, a: a["x"].float()), ("x_dtype",), "mismatch", _multi),
        C("dispatch", "experts", _set("num_tokens_per_expert", lambda r, a: a["num_tokens_per_expert"].repeat(2)),
          ("num_experts",), "mismatch", _multi),
        C("dispatch", "worst-apart", _set("num_worst_tokens", lambda r, a: 64), ("num_worst_tokens",), "mismatch",
          _multi),
        C("dispatch", "channels", _set("config", lambda r, a: Config(num_sms=4)), ("num_channels",), "mismatch",
          _multi),
        C("dispatch", "idx-int32", _set("topk_idx", lambda r, a: a["topk_idx"].int()), ("topk_dtype",), "mismatch",
          _multi),
        C("dispatch", "no-topk", lambda r, a: a.update(topk_idx=None, topk_weights=None), ("num_topk",), "mismatch",
          _multi),
        # cached dispatch
        C("cached", "handle-foreign", _set("handle", lambda r, a: r.foreign["normal"]), ("handle",)),
        C("cached", "handle-tuple", _set("handle", lambda r, a: tuple(a["handle"])), ("handle",)),
        C("cached", "handle-ll", _set("handle", lambda r, a: r.foreign["ll"]), ("handle",)),
        C("cached", "handle-none", _set("handle", lambda r, a: None), ("handle", "layout")),
        C("cached", "x-rows", x_rows, ("x", "handle")),
        C("cached", "x-1d", x_1d, ("x",)),
        C("cached", "x-list", x_list, ("x",)),
        C("cached", "with-idx", _set("topk_idx", lambda r, a: r.case.idx), ("topk_idx",)),
        C("cached", "worst", _set("num_worst_tokens", lambda r, a: 1000), ("num_worst_tokens",)),
        C("cached", "hidden", x_hidden, ("hidden",), "mismatch", _halves),
        C("cached", "x-dtype", _set("x", lambda r, a: a["x"].half()), ("x_dtype",), "mismatch", _multi),
        C("cached", "stale", _set("handle", _older("normal")), ("handle",), "one", _has_older("normal")),
        C("cached", "scales", _set("x", lambda r, a: (a["x"], torch.ones(a["x"].shape[0]))), ("scales",), "mismatch",
          _multi),
        # combine
        C("combine", "x-rows", x_rows, ("x",)),
        C("combine", "x-int", _set("x", lambda r, a: a["x"].int()), ("x",)),
        C("combine", "x-1d", x_1d, ("x",)),
        C("combine", "x-list", x_list, ("x",)),
        C("combine", "x-no-cols", x_no_cols, ("x.shape[1]",)),
        C("combine", "x-float", _set("x", lambda r, a: a["x"].to(_another_float(a["x"]))), ("x", "x_dtype"), "one",
          _multi),
        C("combine", "hidden", x_hidden, ("hidden",), "mismatch", _halves),
        C("combine", "handle-foreign", _set("handle", lambda r, a: r.foreign["normal"]), ("handle",)),
        C("combine", "handle-tuple", _set("handle", lambda r, a: tuple(a["handle"])), ("handle",)),
        C("combine", "handle-ll", _set("handle", lambda r, a: r.foreign["ll"]), ("handle",)),
        C("combine", "handle-none", _set("handle", lambda r, a: None), ("handle",)),
        C("combine", "stale", _set("handle", _older("normal")), ("handle",), "one", _has_older("normal")),
        C("combine", "weights-half", _set("topk_weights", lambda r, a: a["topk_weights"].half()), ("topk_weights",)),
        C("combine", "weights-rows", _set("topk_weights", lambda r, a: _rows_plus_one(a["topk_weights"])),
          ("topk_weights",)),
        C("combine", "weights-1d", _set("topk_weights", lambda r, a: a["topk_weights"].reshape(-1)),
          ("topk_weights",)),
        C("combine", "weights-apart", _set("topk_weights", lambda r, a: None), ("num_topk",), "mismatch", _multi),
        C("combine", "bias-rows", _set("bias", lambda r, a: torch.zeros(r.case.x.shape[0] + 1, a["x"].shape[1],
          dtype=a["x"].dtype)), ("bias",)),
        C("combine", "bias-dtype", _set("bias", lambda r, a: torch.zeros(r.case.x.shape[0], a["x"].shape[1],
          dtype=_another_float(a["x"]))),
          ("bias",)),
        C("combine", "bias-three", _set("bias", lambda r, a: [None, None, None]), ("bias",)),
        C("combine", "bias-str", _set("bias", lambda r, a: "bias"), ("bias",)),
        C("combine", "config-sms", _set("config", lambda r, a: Config(num_sms=1)), ("num_sms",)),
        C("combine", "config-type", _set("config", lambda r, a: 20), ("config",)),
        C("combine", "event", bad_event, ("previous_event",)),
        C("combine", "async-none", _set("async_finish", lambda r, a: None), ("async_finish",)),
        # low-latency dispatch
        C("ll_dispatch", "x-float", _set("x", lambda r, a: a["x"].float()), ("x",)),
        C("ll_dispatch", "x-1d", x_1d, ("x",)),
        C("ll_dispatch", "x-list", x_list, ("x",)),
        C("ll_dispatch", "x-no-cols", x_no_cols, ("x.shape[1]",)),
        C("ll_dispatch", "x-rows", x_rows, ("x", "topk_idx")),
        C("ll_dispatch", "too-many", _too_many, ("num_max_dispatch_tokens_per_rank",)),
        C("ll_dispatch", "cap-zero", _set("num_max_dispatch_tokens_per_rank", lambda r, a: 0),
          ("num_max_dispatch_tokens_per_rank",)),
        C("ll_dispatch", "cap-float", _set("num_max_dispatch_tokens_per_rank", lambda r, a: 8.0),
          ("num_max_dispatch_tokens_per_rank",)),
        C("ll_dispatch", "experts-indivisible", _set("num_experts", lambda r, a: a["num_experts"] + 1),
          ("num_experts",), "own", _multi),
        C("ll_dispatch", "experts-none", _set("num_experts", lambda r, a: None), ("num_experts",)),
        C("ll_dispatch", "idx-float", float_idx, ("topk_idx",)),
        C("ll_dispatch", "idx-1d", flat_idx, ("topk_idx",)),
        C("ll_dispatch", "idx-list", list_idx, ("topk_idx",)),
        C("ll_dispatch", "idx-high", _set("topk_idx", idx_high), ("topk_idx",), "own", _tokens),
        C("ll_dispatch", "idx-low", _set("topk_idx", idx_low), ("topk_idx",), "own", _tokens),
        C("ll_dispatch", "idx-duplicate", _set("topk_idx", _duplicate), ("topk_idx",), "own",
          lambda c, r: _tokens(c, r) and _many_topk(c, r)),
        C("ll_dispatch", "stats-dtype", _set("cumulative_local_expert_recv_stats", lambda r, a: torch.zeros(
            r.case.experts // r.world, dtype=torch.int64)), ("cumulative_local_expert_recv_stats",)),
        C("ll_dispatch", "stats-shape", _set("cumulative_local_expert_recv_stats", lambda r, a: torch.zeros(
            r.case.experts // r.world + 1, dtype=torch.int32)), ("cumulative_local_expert_recv_stats",)),
        C("ll_dispatch", "stats-expanded", _set("cumulative_local_expert_recv_stats", lambda r, a: torch.zeros(
            1, dtype=torch.int32).expand(r.case.experts // r.world)), ("cumulative_local_expert_recv_stats",),
          "own", lambda c, r: c.experts // c.world > 1),
        C("ll_dispatch", "wait-stats-dtype", _set("dispatch_wait_recv_cost_stats", lambda r, a: torch.zeros(
            r.world, dtype=torch.int32)), ("dispatch_wait_recv_cost_stats",)),
        C("ll_dispatch", "fp8-str", _set("use_fp8", lambda r, a: "no"), ("use_fp8",)),
        C("ll_dispatch", "hook-str", _set("return_recv_hook", lambda r, a: "no"), ("return_recv_hook",)),
        C("ll_dispatch", "round-none", _set("round_scale", lambda r, a: None), ("round_scale",)),
        C("ll_dispatch", "ue8m0", _set("use_ue8m0", lambda r, a: True), ("use_ue8m0",)),
        C("ll_dispatch", "fp8-hidden", _set("use_fp8", lambda r, a: True), ("hidden",), "own", _hidden_not_128),
        C("ll_dispatch", "hook-and-async", lambda r, a: a.update(async_finish=True, return_recv_hook=True),
          ("async_finish",)),
        C("ll_dispatch", "cap-apart", _set("num_max_dispatch_tokens_per_rank", lambda r, a: r.case.cap + 1),
          ("num_max_dispatch_tokens_per_rank",), "mismatch", _multi),
        C("ll_dispatch", "experts-apart", _set("num_experts", lambda r, a: 2 * a["num_experts"]), ("num_experts",),
          "mismatch", _multi),
        C("ll_dispatch", "hidden", x_hidden, ("hidden",), "mismatch", _halves),
        C("ll_dispatch", "topk-apart", _set("topk_idx", lambda r, a: a["topk_idx"][:, :-1]), ("num_topk",),
          "mismatch", lambda c, r: _multi(c, r) and _many_topk(c, r)),
        C("ll_dispatch", "fp8-apart", _set("use_fp8", lambda r, a: True), ("use_fp8",), "mismatch",
          lambda c, r: _multi(c, r) and _hidden_128(c, r)),
        # low-latency combine
        C("ll_combine", "x-float", _set("x", lambda r, a: a["x"].float()), ("x",)),
        C("ll_combine", "x-shape", _set("x", lambda r, a: a["x"][:, :-1]), ("x",)),
        C("ll_combine", "x-2d", _set("x", lambda r, a: a["x"][0]), ("x",)),
        C("ll_combine", "idx-rows", _set("topk_idx", lambda r, a: a["topk_idx"][1:]), ("topk_idx",), "own", _tokens),
        C("ll_combine", "idx-other", _set("topk_idx", _another_id), ("topk_idx",), "own", _picked),
        C("ll_combine", "idx-float", float_idx, ("topk_idx",)),
        C("ll_combine", "weights-half", _set("topk_weights", lambda r, a: a["topk_weights"].half()),
          ("topk_weights",)),
        C("ll_combine", "weights-cols", _set("topk_weights", lambda r, a: a["topk_weights"][:, :0]),
          ("topk_weights",)),
        C("ll_combine", "handle-normal", _set("handle", lambda r, a: r.foreign["normal"]), ("handle",)),
        C("ll_combine", "handle-foreign", _set("handle", lambda r, a: r.foreign["ll"]), ("handle",)),
        C("ll_combine", "handle-tuple", _set("handle", lambda r, a: tuple(a["handle"])), ("handle",)),
        C("ll_combine", "stale", _set("handle", _older("ll")), ("handle",), "one", _has_older("ll")),
        C("ll_combine", "out-shape", _set("out", lambda r, a: torch.zeros(r.case.x.shape[0] + 1, r.case.w.hidden,
          dtype=torch.bfloat16)), ("out",)),
        C("ll_combine", "out-dtype", _set("out", lambda r, a: torch.zeros(r.case.x.shape, dtype=torch.float32)),
          ("out",)),
        C("ll_combine", "out-expanded", _set("out", lambda r, a: torch.zeros(1, r.case.w.hidden, dtype=torch.bfloat16)
          .expand(r.case.x.shape)), ("out",), "own", lambda c, r: c.w.x[r].shape[0] > 1),
        C("ll_combine", "out-grad", _set("out", lambda r, a: torch.zeros(r.case.x.shape, dtype=torch.bfloat16,
          requires_grad=True)), ("out",)),
        C("ll_combine", "logfmt", _set("use_logfmt", lambda r, a: True), ("use_logfmt",)),
        C("ll_combine", "zero-copy-str", _set("zero_copy", lambda r, a: "no"), ("zero_copy",)),
        C("ll_combine", "async-2", _set("async_finish", lambda r, a: 2), ("async_finish",)),
        C("ll_combine", "zero-copy", _set("zero_copy", lambda r, a: True), ("zero_copy",)),
        C("ll_combine", "wait-stats", _set("combine_wait_recv_cost_stats", lambda r, a: torch.zeros(3, 3)),
          ("combine_wait_recv_cost_stats",)),
        C("ll_combine", "hook-and-async", lambda r, a: a.update(async_finish=True, return_recv_hook=True),
          ("async_finish",)),
    ]  # fmt: skip
    return table


CORRUPTIONS = _table()


# ---- one step: a valid round, one corrupted call, a valid round -------------------------------------------------
_VALID_AFTER = {
    "layout": "fresh",
    "clean": "low_latency",
    "local_buffer": "fresh",
    "next_buffer": "low_latency",
    "dispatch": "fresh",
    "cached": "cached",
    "combine": "combine",
    "ll_dispatch": "low_latency",
    "ll_combine": "low_latency",
}


def _call_args(rig: Rig, op: str, rng: random.Random) -> tuple[Callable[..., Any], Args]:
    """A valid call of `op` (running the valid round it needs first), as (method, keyword arguments)."""
    c, b = rig.case, rig.buffer
    if op in ("cached", "combine") and "normal" not in rig.state:
        rig.fresh(rng)
    if op in ("ll_combine", "next_buffer") and "ll" not in rig.state:
        rig.low_latency(rng)
    if op == "layout":
        return b.get_dispatch_layout, dict(topk_idx=c.idx, num_experts=c.experts)
    if op == "clean":
        if rng.random() < 0.5:  # a hook lost (an exception between dispatch and hook, say): clean takes its receive
            b.low_latency_dispatch(c.x, c.idx, c.cap, c.experts, use_fp8=False, return_recv_hook=True)
        return b.clean_low_latency_buffer, dict(num_max_dispatch_tokens_per_rank=c.cap, hidden=c.w.hidden,
                                                num_experts=c.experts)  # fmt: skip
    if op == "local_buffer":
        return b.get_local_buffer_tensor, dict(dtype=torch.bfloat16, size=(4, 2), offset=8)
    if op == "next_buffer":
        # on the other Buffer (with its own handle): a zero-copy buffer on this one would make zero_copy=True valid
        return rig.other.get_next_low_latency_combine_buffer, dict(handle=rig.foreign["ll"])
    if op == "dispatch":
        per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(c.idx, c.experts)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        return b.dispatch, dict(x=c.x, topk_idx=c.idx, topk_weights=c.weights, **layout)
    if op == "cached":
        return b.dispatch, dict(x=c.x, handle=rig.state["normal"]["handle"])
    if op == "combine":  # the dispatch may still be pending (async): the combine must complete it first
        st = rig.state["normal"]
        x = st["recv_x"] if st["dtype"] in _COMBINE_DTYPES else rig.received()["recv_x"].to(torch.bfloat16)
        return b.combine, dict(x=x, handle=st["handle"], topk_weights=st["recv_w"])
    if op == "ll_dispatch":
        args = dict(x=c.x, topk_idx=c.idx, num_max_dispatch_tokens_per_rank=c.cap, num_experts=c.experts)
        return b.low_latency_dispatch, dict(args, use_fp8=False)
    st = rig.state["ll"]
    return b.low_latency_combine, dict(x=st["recv"], topk_idx=st["idx"], topk_weights=c.weights, handle=st["handle"])


def _pick(rng: random.Random, rig: Rig) -> tuple[Corruption, list[int]]:
    """A corruption and the ranks that apply it, drawn alike on every rank."""
    world = rig.world
    while True:
        cor = rng.choice(CORRUPTIONS)
        if cor.kind == "all":
            targets = list(range(world))
        elif cor.kind in ("mismatch", "one") or rng.random() < 0.7:
            targets = [rng.randrange(world)]
        else:
            targets = list(range(world))
        if all(cor.needs(rig.case, r) for r in targets):
            return cor, targets


def _judge(cor: Corruption, spoiled: bool, error: BaseException | None) -> str | None:
    """What is wrong with this rank's outcome of a corrupted call, or None."""
    said = f"{type(error).__name__}: {error}" if error is not None else "returned normally"
    if cor.kind == "local" and not spoiled:
        return None if error is None else f"an unspoiled rank raised in a local call ({said})"
    if error is None or not isinstance(error, EXPECTED):
        return f"expected a documented error, got {said}"
    if cor.kind == "mismatch" and not isinstance(error, CollectiveMismatchError):
        return f"expected CollectiveMismatchError, got {said}"
    if (spoiled or cor.kind == "mismatch") and not any(n in str(error) for n in cor.names):
        return f"the message names none of {list(cor.names)}: {said}"
    return None


def run_step(rig: Rig, rng: random.Random) -> tuple[str, list[str]]:
    """One step; returns its description and the problems this rank saw."""
    problems = rig.valid_round(rng)
    cor, targets = _pick(rng, rig)
    method, args = _call_args(rig, cor.op, rng)
    spoiled = rig.rank in targets
    if spoiled:
        cor.spoil(rig, args)
    error = None
    start = time.monotonic()
    try:
        method(**args)
    except CommTimeoutError as e:  # a peer was left waiting: a finding, and the Buffer may be unusable now
        error = e
    except Exception as e:  # noqa: BLE001 - judged below
        error = e
    what = f"{cor.op}/{cor.name} on ranks {targets}"
    verdict = _judge(cor, spoiled, error)
    if verdict:
        problems.append(f"{what}: {verdict} ({time.monotonic() - start:.1f} s)")
    if not isinstance(error, CommTimeoutError):
        problems += [f"after {what}: {p}" for p in rig.deferred() + rig.valid_round(rng, _VALID_AFTER[cor.op])]
        problems += rig.deferred()
    return what, problems


def fuzz_world(rank: int, world: int, backend: str, seeds: list[int], steps: int) -> dict:
    """Run `steps` steps for each seed on one world; stops at the first step where some rank saw a problem.
    Returns {"calls": corrupted calls made, "seed": the last seed run, "findings": [(seed, step, rank, text)]}."""
    if backend == "cuda_sim":
        from deep_ep.testing import symm_mem_emulation

        symm_mem_emulation.register()
    rig = Rig(rank, world, backend)
    calls, findings = 0, []
    for seed in seeds:
        rng = random.Random(seed * 1000 + world)
        rig.new_case(draw_case(rng, rank, world, seed))
        for step in range(steps):
            try:
                _, problems = run_step(rig, rng)
            except Exception as e:  # noqa: BLE001 - a valid round that raised is a finding too
                problems = [f"a valid round raised {type(e).__name__}: {e}"]
            calls += 1
            everyone = [None] * world
            dist.all_gather_object(everyone, [(seed, step, rank, p) for p in problems])
            findings = [f for rank_findings in everyone for f in rank_findings]
            if findings:
                return dict(calls=calls, seed=seed, findings=findings)
    return dict(calls=calls, seed=seeds[-1], findings=[])


# ---- the driver --------------------------------------------------------------------------------------------------
def fuzz(backend: str, world: int, seeds: list[int], steps: int, timeout: float = 600.0) -> tuple[int, list]:
    """Fuzz `seeds` on fresh worlds (a new one after each finding); returns (corrupted calls, findings)."""
    env = {"TRITON_INTERPRET": "1"}
    calls, findings = 0, []
    with tempfile.TemporaryDirectory(prefix="deep_ep_fuzz_") as sim_dir:
        env["DEEP_EP_SIM_DIR"] = sim_dir
        while seeds:
            try:
                out = run_ranks(world, fuzz_world, backend, seeds, steps, env=env, timeout=timeout)[0]
            except Exception as e:  # noqa: BLE001 - a crash or a hang of the world
                findings.append((seeds[0], -1, -1, f"world failed from seed {seeds[0]}: {e}"))
                seeds = seeds[1:]
                continue
            calls += out["calls"]
            findings += out["findings"]
            seeds = [s for s in seeds if s > out["seed"]]
    return calls, findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0:20", help="a range start:stop")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--backends", nargs="+", default=["reference", "cuda_sim"])
    parser.add_argument("--steps", type=int, default=4, help="corrupted calls per seed")
    options = parser.parse_args(argv)
    start, stop = (int(v) for v in options.seeds.split(":"))
    total = 0
    problems = []
    for backend in options.backends:
        for world in options.worlds:
            began = time.monotonic()
            calls, findings = fuzz(backend, world, list(range(start, stop)), options.steps)
            total += calls
            problems += findings
            print(f"{backend} world={world}: {calls} corrupted calls, {len(findings)} findings "
                  f"({time.monotonic() - began:.0f} s)", flush=True)  # fmt: skip
            for f in findings:
                print("  seed {} step {} rank {}: {}".format(*f), flush=True)
    print(f"total: {total} corrupted calls, {len(problems)} findings")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
