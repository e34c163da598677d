"""The cuda backend's logic on the CPU: registry and availability, the push plans, the combine reduction,
and the whole backend end to end on a CPU stand-in for symmetric memory (shared files + a gloo barrier),
compared bit for bit with the reference backend by the GPU self-test's own comparison code.

What only a GPU can check (symmetric memory, streams, the barrier kernel, the Triton kernel compiled for a
GPU) is in tools/cuda_selftest.py; the `gpu`-marked test at the end runs it where GPUs exist.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import deep_ep
from deep_ep import Buffer
from deep_ep.backends import availability, get_backend_class
from deep_ep.backends.base import DispatchArgs
from deep_ep.backends.cuda import (
    COPY_ENGINES_ENV,
    CudaBackend,
    PushCopy,
    combine_plan,
    combine_push_plan,
    copy_engines_wanted,
    dispatch_plan,
    dispatch_push_plan,
    pad_columns,
    pull_plan,
    rows_received,
    source_words,
    workspace_rows,
)
from deep_ep.backends.cuda_low_latency import LowLatencyLayout, kernel_refusal
from deep_ep.backends.peer_memory import workspace_size
from deep_ep.backends.reference import _host_prefix_matrices, _ordered_sum
from deep_ep.errors import BackendUnavailableError
from deep_ep.kernels.ordered_sum import (
    ordered_gather_sum,
    row_index_from_splits,
    triton_usable,
)
from deep_ep.packing import RowFormat
from deep_ep.routing import Route, channel_of_tokens
from deep_ep.testing import diff, run_ranks
from deep_ep.testing.compare import assert_bit_equal, first_mismatch
from deep_ep.testing.symm_mem_emulation import DIRECTORY_ENV, SimCudaBackend
from tools import cuda_selftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- registry and availability ---------------------------------------------------------------------------
def test_registered_and_importable_without_cuda() -> None:
    assert "cuda" in deep_ep.list_backends()
    cls = get_backend_class("cuda")
    assert cls is CudaBackend and cls.name == "cuda" and cls.device_types == ("cuda",)
    assert cls.priority > get_backend_class("reference").priority  # "auto" prefers it where it is usable
    assert cls.supports("normal") and cls.supports("low_latency")


def _availability_on_gloo(group: dist.ProcessGroup) -> dict:
    reasons = availability(group, torch.device("cpu"))
    try:
        deep_ep.Buffer(group, backend="cuda")
        explicit = None
    except BackendUnavailableError as error:
        explicit = str(error)
    return {
        "registry": reasons["cuda"],
        "direct": CudaBackend.unavailable_reason(group, torch.device("cuda", 0)),
        "cpu": CudaBackend.unavailable_reason(group, torch.device("cpu")),
        "explicit": explicit,
        "auto": deep_ep.Buffer(group).backend,
    }


def _check_unavailable_here(got: dict) -> None:
    assert "serves devices ['cuda']" in got["registry"]
    if not torch.cuda.is_available():
        assert got["direct"].startswith("CUDA is not available")
    assert "not a CUDA GPU" in got["cpu"]
    assert got["explicit"] is not None and "'cuda' is unavailable" in got["explicit"]
    assert got["auto"] == "reference"


# ---- the push plans: simulate every rank's copies and compare with the all-to-all they replace -------------
def _random_counts(gen: torch.Generator, num_ranks: int) -> list[list[int]]:
    counts = torch.randint(0, 6, (num_ranks, num_ranks), generator=gen)
    counts[torch.rand(num_ranks, num_ranks, generator=gen) < 0.3] = 0  # empty pairs, idle ranks
    return counts.tolist()


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 5, 8])
def test_plans_place_rows_exactly_as_the_all_to_all(num_ranks: int) -> None:
    gen = torch.Generator().manual_seed(num_ranks)
    for _ in range(20):
        counts = _random_counts(gen, num_ranks)
        # Dispatch: row (s, d, i) = the i-th row rank s sends to rank d; SPEC order on d is s, then i.
        expected = {d: [(s, i) for s in range(num_ranks) for i in range(counts[s][d])] for d in range(num_ranks)}
        got = {d: [None] * rows_received(counts, d, True) for d in range(num_ranks)}
        for s in range(num_ranks):
            sent = [(d, i) for d in range(num_ranks) for i in range(counts[s][d])]  # send_tokens order
            plan = dispatch_plan(counts, s)
            assert sorted(c.peer for c in plan) == [d for d in range(num_ranks) if counts[s][d]]
            for c in plan:
                for j in range(c.count):
                    d, i = sent[c.src_begin + j]
                    assert d == c.peer
                    assert got[d][c.dst_row + j] is None, "two rows written to one slot"
                    got[d][c.dst_row + j] = (s, i)
        assert got == expected
        assert workspace_rows(counts, True) == max(len(rows) for rows in expected.values())

        # Combine: rank d returns its received rows; rank s must get them aligned with its send order.
        back = {s: [None] * rows_received(counts, s, False) for s in range(num_ranks)}
        for d in range(num_ranks):
            held = expected[d]  # (s, i) of each received row, in order
            for c in combine_plan(counts, d):
                for j in range(c.count):
                    s, i = held[c.src_begin + j]
                    assert s == c.peer
                    back[s][c.dst_row + j] = (d, i)
        for s in range(num_ranks):
            assert back[s] == [(d, i) for d in range(num_ranks) for i in range(counts[s][d])]
        assert workspace_rows(counts, False) == max(len(rows) for rows in back.values())


def test_plan_order_and_sizes() -> None:
    counts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [c.peer for c in dispatch_plan(counts, 1)] == [0, 1, 2]  # ascending: push_plan relies on it
    assert dispatch_plan(counts, 1)[2] == PushCopy(peer=2, src_begin=9, count=6, dst_row=3)
    assert [c.peer for c in combine_plan([[0, 1], [0, 2]], 1)] == [0, 1]
    assert workspace_size(0) == workspace_size(1) == 32 << 20
    assert workspace_size(5, minimum=1) == 8 and workspace_size(8, minimum=1) == 8
    assert workspace_size((32 << 20) + 1) == 64 << 20


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 5])
def test_push_plans_send_every_row_home(num_ranks: int) -> None:
    # Every rank's dispatch plan places (source, token) pairs in SPEC order on each destination; the combine
    # plan of that destination sends each received row back to the row its source's send order gives it.
    gen = torch.Generator().manual_seed(num_ranks)
    in_rank = [
        torch.rand(int(torch.randint(0, 7, (1,), generator=gen)), num_ranks, generator=gen) < 0.5
        for _ in range(num_ranks)
    ]
    counts = [m.sum(0).tolist() for m in in_rank]
    send_tokens = [m.t().nonzero()[:, 1] for m in in_rank]
    placed = {d: {} for d in range(num_ranks)}
    for s in range(num_ranks):
        plan = dispatch_push_plan(counts, s, in_rank[s])
        assert plan.capacity == workspace_rows(counts, True)
        assert plan.received == rows_received(counts, s, True)
        assert torch.equal(plan.dest >= 0, in_rank[s])
        for t, d in (plan.dest >= 0).nonzero().tolist():
            row = int(plan.dest[t, d])
            assert row not in placed[d], "two rows written to one slot"
            placed[d][row] = (s, t)
    for d in range(num_ranks):
        expected = [(s, t) for s in range(num_ranks) for t in in_rank[s][:, d].nonzero()[:, 0].tolist()]
        assert [placed[d][row] for row in range(len(expected))] == expected
        back = combine_push_plan(counts, d, torch.device("cpu"))
        assert back.capacity == workspace_rows(counts, False)
        # Every row goes home to its source, except the rows d received from itself, which stay.
        assert (back.dest >= 0).sum(1).tolist() == [int(s != d) for s, _ in expected]
        for row, (s, t) in enumerate(expected):
            if s != d:
                home = int(back.dest[row, s])
                assert send_tokens[s][home] == t and home - sum(counts[s][:d]) in range(counts[s][d])
        # The combine takes the rows round-robin over the sources they return to: the first row of each
        # source's block, sources ascending, then the second, ...
        within = [[s for s, _ in expected[: row + 1]].count(expected[row][0]) - 1 for row in range(len(expected))]
        round_robin = sorted(range(len(expected)), key=lambda row: (within[row], expected[row][0]))
        assert back.order.tolist() == [row for row in round_robin if expected[row][0] != d]
        # A cached dispatch pulls each received row from the (source, token) the push would have sent it from,
        # in the same round-robin order, out of regions that hold every rank's tokens.
        recv_src_idx = torch.tensor([t for _, t in expected], dtype=torch.int32)
        pull = pull_plan([counts[s][d] for s in range(num_ranks)], recv_src_idx, [m.shape[0] for m in in_rank])
        assert pull.out_row.tolist() == round_robin and pull.capacity == max(m.shape[0] for m in in_rank)
        assert list(zip(pull.peer.tolist(), pull.row.tolist())) == [expected[row] for row in round_robin]


# ---- byte-row helpers --------------------------------------------------------------------------------------
def test_pad_source_words_and_field_views() -> None:
    x = torch.randn(5, 7).to(torch.bfloat16)
    w = torch.rand(5, 3)
    fmt = RowFormat.of(x=x, topk_weights=w)
    rows = fmt.pack(x=x, topk_weights=w)  # 14 + 12 = 26 bytes
    padded = pad_columns(rows, 32)
    assert padded.shape == (5, 32) and torch.equal(padded[:, :26], rows) and not padded[:, 26:].any()
    assert pad_columns(padded, 32) is padded
    words, _ = source_words(padded, 32)
    assert words.dtype == torch.int32 and words.data_ptr() == padded.data_ptr()  # a view
    words, _ = source_words(rows, 32)  # 26-byte rows hold no whole words: a padded copy
    assert words.shape == (5, 8) and torch.equal(words.view(torch.uint8)[:, :26], rows)
    inner = padded.view(-1)[4:84].view(5, 16)  # 4-aligned start: a view, but not 16-byte aligned rows
    words, aligned = source_words(inner, 16)
    assert words.data_ptr() == inner.data_ptr() and not aligned
    xs = fmt.field_view(padded, "x")
    assert xs.data_ptr() == padded.data_ptr() and torch.equal(xs, x)  # offset 0: a view, no copy
    ws = fmt.field_view(padded, "topk_weights")  # offset 14: not 4-aligned, so a copy
    assert torch.equal(ws, w)
    empty = pad_columns(rows[:0], 32)
    assert fmt.field_view(empty, "x").shape == (0, 7)


def test_pack_makes_size_one_dims_dense() -> None:
    # fp8 scales [N, 1] transposed from [1, N] are "contiguous" with stride(-1) != 1; packing must cope.
    scales = torch.rand(1, 9).t()
    fmt = RowFormat.of(scales=scales)
    assert torch.equal(fmt.unpack(fmt.pack(scales=scales))["scales"], scales)


# ---- the combine reduction ----------------------------------------------------------------------------------
def _random_route(gen: torch.Generator, num_tokens: int, num_ranks: int) -> Route:
    in_rank = torch.rand(num_tokens, num_ranks, generator=gen) < 0.5
    counts = torch.zeros(num_ranks, num_ranks, dtype=torch.long)
    counts[0] = in_rank.sum(0)
    return Route.exact(in_rank, counts, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_ordered_gather_sum_matches_reference_bits(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    for num_tokens, num_ranks, hidden in [(0, 2, 8), (1, 1, 5), (23, 3, 16), (40, 4, 33)]:
        route = _random_route(gen, num_tokens, num_ranks)
        total = sum(route.send_splits)
        pitch = hidden + 5  # rows as strided views of wider rows, as the workspace holds them
        rows = (torch.randn(total, pitch, generator=gen) * 3).to(dtype)[:, :hidden]
        rows[rows.abs() < 0.3] = -0.0  # signed zeros must survive the order of additions
        biases = tuple(torch.randn(num_tokens, hidden, generator=gen).to(dtype) for _ in range(2))
        row_index = row_index_from_splits(route.send_tokens, route.send_splits, num_tokens)
        for nb in range(3):
            expected = rows.new_empty(num_tokens, hidden)
            _ordered_sum(route, rows, biases[:nb], num_tokens, expected)
            got = ordered_gather_sum(rows, row_index, biases[:nb])
            assert first_mismatch(got, expected) is None, (num_tokens, num_ranks, hidden, nb)
            # One source's rows read from a tensor of their own, where row_index's column says.
            d = num_tokens % num_ranks
            begin, end = route.destination_blocks()[d]
            own_rows = torch.cat([torch.randn(3, hidden, generator=gen).to(dtype), rows[begin:end]])
            own_index = row_index.clone()
            own_index[:, d] = torch.where(own_index[:, d] >= 0, own_index[:, d] - begin + 3, -1)
            got = ordered_gather_sum(rows, own_index, biases[:nb], own=(d, own_rows))
            assert first_mismatch(got, expected) is None, (num_tokens, num_ranks, hidden, nb, "own")
    assert not triton_usable(rows)  # CPU tensors never take the Triton path


def test_row_index_from_splits() -> None:
    gen = torch.Generator().manual_seed(5)
    route = _random_route(gen, 31, 4)
    index = row_index_from_splits(route.send_tokens, route.send_splits, 31)
    begin = 0
    for d, size in enumerate(route.send_splits):
        for row in range(begin, begin + size):
            assert index[route.send_tokens[row], d] == row
        begin += size
    assert int((index >= 0).sum()) == sum(route.send_splits)
    assert row_index_from_splits(route.send_tokens[:0], [0, 0], 3).eq(-1).all()


def test_row_index_own_received_points_into_the_received_rows() -> None:
    # Every rank's view of one exchange: what rank r sent itself is the block of its received rows that follows
    # the rows of lower sources, in token order; the own column must point there, the others stay unchanged.
    gen = torch.Generator().manual_seed(6)
    num_ranks, num_tokens = 4, 23
    in_rank = [torch.rand(num_tokens, num_ranks, generator=gen) < 0.6 for _ in range(num_ranks)]
    counts = torch.stack([m.sum(0) for m in in_rank])  # [source, destination]
    for rank in range(num_ranks):
        route = Route.exact(in_rank[rank], counts, rank)
        index = route.row_index_own_received(rank)
        assert index is route.row_index_own_received(rank)  # built once
        others = [d for d in range(num_ranks) if d != rank]
        assert torch.equal(index[:, others], route.row_index[:, others])
        received_tokens = [t for s in range(num_ranks) for t in in_rank[s][:, rank].nonzero()[:, 0].tolist()]
        received_from = [s for s in range(num_ranks) for _ in range(int(counts[s, rank]))]
        for t in range(num_tokens):
            row = int(index[t, rank])
            assert (row >= 0) == bool(in_rank[rank][t, rank])
            if row >= 0:
                assert (received_from[row], received_tokens[row]) == (rank, t)


def _run_in_interpreter(code: str) -> None:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1 (set before Triton is imported)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed (an extra check)")
def test_triton_kernel_logic_in_the_interpreter() -> None:
    # Runs the real kernel body in Triton's CPU interpreter (float16/float32: the interpreter truncates
    # float32 -> bfloat16 instead of rounding, unlike the GPU).
    code = (
        "import torch\n"
        "from deep_ep.kernels import triton_ordered_sum as k\n"
        "from deep_ep.kernels.ordered_sum import torch_ordered_gather_sum, row_index_from_splits\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dtype in (torch.float16, torch.float32):\n"
        "    for h, nb in ((5, 0), (130, 2), (1100, 1)):\n"
        "        m = torch.rand(21, 3, generator=g) < 0.6\n"
        "        st = m.t().nonzero()[:, 1]; sp = m.sum(0).tolist()\n"
        "        idx = row_index_from_splits(st, sp, 21)\n"
        "        rows = torch.randn(sum(sp), h + 3, generator=g).to(dtype)[:, :h]\n"
        "        b = tuple(torch.randn(21, h, generator=g).to(dtype) for _ in range(nb))\n"
        "        a, e = k.ordered_gather_sum(rows, idx, b), torch_ordered_gather_sum(rows, idx, b)\n"
        "        assert torch.equal(a.view(torch.uint8), e.view(torch.uint8)), (dtype, h, nb)\n"
        "        own = (1, torch.cat([rows[:sp[0]], rows]))  # source 1's rows from their own tensor\n"
        "        oidx = torch.where(idx >= 0, idx + sp[0] * (torch.arange(3) == 1).int(), -1)\n"
        "        a = k.ordered_gather_sum(rows, oidx, b, None, own)  # the same rows, source 1's shifted\n"
        "        assert torch.equal(a.view(torch.uint8), e.view(torch.uint8)), (dtype, h, nb, 'own')\n"
        "        for out in (torch.empty(21, h, dtype=dtype), torch.empty(h, 21, dtype=dtype).t()):\n"
        "            assert k.ordered_gather_sum(rows, idx, b, out) is out  # written in place, any strides\n"
        "            assert torch.equal(out.contiguous().view(torch.uint8), e.view(torch.uint8)), (dtype, h, nb)\n"
    )
    _run_in_interpreter(code)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed (an extra check)")
def test_row_gather_kernel_in_the_interpreter() -> None:
    # The few-SM row gather (the reference's own rows beside its all-to-all) in Triton's CPU interpreter: word
    # types of every width, int32 and int64 indices, strided source and output rows, rows wider than one block
    # (column chunks), row counts that leave a tile partly empty, fewer programs than tiles, repeated and skipped
    # source rows; against index_select.
    code = (
        "import torch\n"
        "from deep_ep.kernels import triton_row_gather as k\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dtype, words, n, programs, itype in ((torch.int64, 1792, 9, 2, torch.int64),\n"
        "        (torch.int32, 9000, 5, 1, torch.int32), (torch.int16, 7, 37, 3, torch.int64),\n"
        "        (torch.uint8, 33, 1, 16, torch.int32)):\n"
        "    src = torch.randint(-100, 100, (23, words + 5), generator=g).to(dtype)[:, :words]\n"
        "    index = torch.randint(0, 23, (n,), generator=g).to(itype)\n"
        "    out = torch.full((n, words + 3), 7, dtype=dtype)[:, :words]\n"
        "    assert k.gather_rows(src, index, out, programs) is out\n"
        "    assert torch.equal(out, src.index_select(0, index.long())), (dtype, words, n, programs)\n"
    )
    _run_in_interpreter(code)


def test_row_gather_beside_on_the_host_is_index_select() -> None:
    # Host rows take the torch path (the kernel is for CUDA gathers that run beside an all-to-all).
    from deep_ep.kernels.row_gather import gather_rows_beside

    rows = torch.randint(0, 256, (40, 14336), dtype=torch.uint8)
    index = torch.tensor([3, 3, 0, 39, 17])
    out = torch.empty(5, 14336, dtype=torch.uint8)
    assert gather_rows_beside(rows, index, out) is out
    assert torch.equal(out, rows[index])


# ---- the whole backend on a CPU stand-in for symmetric memory ----------------------------------------------
def _sim_round(rank: int, world: int, opts: cuda_selftest.Options) -> tuple:
    # One world for both checks (worlds cost seconds on a loaded 2-core machine); availability first, before
    # rank_main registers the stand-in (which "auto" would then pick).
    reasons = _availability_on_gloo(dist.group.WORLD)
    return cuda_selftest.rank_main(rank, world, opts), reasons


def _sim_cases(world: int) -> list[cuda_selftest.Case]:
    uneven = [5, 0, 9][:world]
    return [
        cuda_selftest.Case("uniform", 12, 128, 8, 3, "uniform", 1),
        cuda_selftest.Case("sparse-odd-hidden", 9, 7, 6, 2, "sparse", 2),  # rows not 16-byte multiples
        cuda_selftest.Case("uneven-idle", uneven, 64, 9, 2, "idle_rank", 3),
        cuda_selftest.Case("no-tokens", 0, 16, 6, 2, "uniform", 4),
        cuda_selftest.Case("bigger", 40, 256, 12, 4, "skewed", 5),  # forces the workspace to grow
    ]


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton not installed (pip install -e '.[test]')"
)
@pytest.mark.parametrize("copy_engines", ["0", "1"])
def test_backend_end_to_end_on_host_shared_memory_and_unavailable_here(tmp_path, copy_engines: str) -> None:
    # EMULATION: torch symmetric memory is replaced by shared files + gloo barriers and the push kernel runs in
    # Triton's CPU interpreter; the backend code and the kernel are the real ones. The combine sends its rows by
    # the push kernel ("0") or as block copies ("1", on a GPU the copy engines' work).
    world = 3  # odd, with an idle rank and a rank without tokens among the workloads
    opts = cuda_selftest.Options(
        candidate="cuda_sim", timing=False, cases=_sim_cases(world), register=("cuda_sim", SimCudaBackend)
    )
    env = {DIRECTORY_ENV: str(tmp_path), "TRITON_INTERPRET": "1", COPY_ENGINES_ENV: copy_engines}
    results = run_ranks(world, _sim_round, opts, env=env)
    _check_unavailable_here(results[0][1])
    reports = [report for report, _ in results]
    failures = [(r, name, why) for r, rep in enumerate(reports) for name, why in rep.checks if why is not None]
    assert not failures, failures[:5]
    assert len(reports[0].checks) > 100
    grown = {name.split("-rank")[0] for name in os.listdir(tmp_path)}
    assert len(grown) >= 2, f"the workspace never regrew: {sorted(grown)}"


def test_copy_engines_setting(monkeypatch) -> None:
    monkeypatch.delenv(COPY_ENGINES_ENV, raising=False)
    assert [copy_engines_wanted(r) for r in (1, 2, 3, 4)] == [False, True, False, False]  # auto: 2 ranks
    monkeypatch.setenv(COPY_ENGINES_ENV, "1")
    assert copy_engines_wanted(4) and copy_engines_wanted(2)
    monkeypatch.setenv(COPY_ENGINES_ENV, "0")
    assert not copy_engines_wanted(2)
    monkeypatch.setenv(COPY_ENGINES_ENV, "yes")
    with pytest.raises(ValueError, match=COPY_ENGINES_ENV):
        copy_engines_wanted(2)


def test_host_tensors_ride_on_the_device_of_a_device_only_group() -> None:
    # The agreement check all-gathers a CPU tensor; an NCCL group carries only CUDA tensors.
    from deep_ep.comm import Comm

    comm = Comm.__new__(Comm)
    comm.device_types = {"cuda"}
    assert comm.wire_device(torch.device("cpu")) == torch.device("cuda")
    comm.device_types = {"cpu", "cuda"}
    assert comm.wire_device(torch.device("cpu")) == torch.device("cpu")
    comm.device_types = {"cpu"}
    assert comm.wire_device(torch.device("cuda", 1)) == torch.device("cpu")


# ---- on a GPU host -----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_selftest_quick() -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    world = min(4, torch.cuda.device_count())
    script = os.path.join(ROOT, "tools", "cuda_selftest.py")
    subprocess.run([sys.executable, script, "--world", str(world), "--quick", "--no-timing"], check=True, timeout=600)


# ---- low-latency kernels on the emulated symmetric memory --------------------------------------------------
def test_low_latency_layout_regions_do_not_overlap_and_stay_aligned() -> None:
    for ranks, cap, hidden, experts, topk in ((2, 128, 7168, 256, 8), (3, 9, 130, 6, 3), (8, 1, 2, 8, 1)):
        lay = LowLatencyLayout(ranks, cap, hidden, experts, topk)
        regions = [
            (0, 2 * lay.msg_size),
            (lay.flag_base, lay.flag_base + 2 * lay.flag_size),
            (lay.rows_base, lay.rows_base + 2 * lay.rows_size),
        ]
        assert all(end <= nxt for (_, end), (nxt, _) in zip(regions, regions[1:]))
        assert lay.pitch * 4 >= 2 * hidden and lay.pitch % 4 == 0  # whole 16-byte rows, room for bf16
        assert lay.flag_size >= 2 * lay.slots and lay.flag_base % 4 == 0 and lay.rows_base % 4 == 0
        assert lay.nbytes == (lay.rows_base + 2 * lay.rows_size) * 4
    assert kernel_refusal(7, False, "fp8") and kernel_refusal(6, True, "int8") and not kernel_refusal(8, True, "int8")


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton not installed (pip install -e '.[test]')"
)
def test_low_latency_kernels_match_reference_on_emulated_symmetric_memory(tmp_path) -> None:
    # EMULATION: torch symmetric memory is replaced by shared files + gloo barriers
    # (deep_ep.testing.symm_mem_emulation) and the Triton kernels run in Triton's CPU interpreter; the backend
    # code and the kernels themselves are the real ones. Every format and routing family, 3 ranks, bit for bit.
    families = ["uniform", "skewed", "sparse", "idle_rank", "empty_rank", "max_tokens", "small_hidden"]
    cases = diff.make_cases(
        3,
        modes=["low_latency"],
        dtypes=list(diff.LL_FORMATS),
        families=families,
        num_tokens=6,
        hidden=128,
        num_topk=3,
        experts_per_rank=2,
    )
    plan = diff.Plan([diff.Participant.parse(p) for p in ("reference", "cuda_sim")], cases, comm_timeout=60)
    env = {"TRITON_INTERPRET": "1", DIRECTORY_ENV: str(tmp_path)}
    report = diff.run_local(3, plan, setup="deep_ep.testing.symm_mem_emulation:register", timeout=600, env=env)
    assert report.ok, report.format()
    compared = {(c["case_index"], c["op"]) for c in report.checks if c["participant"].startswith("cuda_sim")}
    assert compared == {(i, op) for i in range(len(cases)) for op in ("low_latency_dispatch", "low_latency_combine")}
    # The kernels' own workspace was used.
    assert any(name.startswith("low_latency-") and "-gen" in name for name in os.listdir(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed (an extra check)")
def test_push_kernel_places_rows_in_the_interpreter() -> None:
    # The push kernel alone in Triton's CPU interpreter: three "ranks" are three areas of one tensor (the
    # deltas between them), rows go to random destination rows or nowhere; whole-row tiles with the prefetch,
    # and rows wider than a tile (the chunked path), each with and without a narrow companion tensor pushed in
    # the same launch into its own region, against a torch oracle.
    code = (
        "import torch\n"
        "from deep_ep.kernels.triton_normal import push_rows_kernel\n"
        "g = torch.Generator().manual_seed(0)\n"
        "R, N, AREA, REGION2, PITCH2 = 3, 13, 4096, 2048, 12\n"
        "cases = ((24, 4, 32, 28, 8, 0), (40, 2, 16, 40, 0, 0), (7, 8, 8, 8, 4, 1), (40, 2, 16, 40, 0, 1))\n"
        "for (words, rows, block, pitch, region, has_order), words2 in zip(cases * 2, (0,) * 4 + (5, 9, 1, 12)):\n"
        "    src = torch.randint(-2**31, 2**31 - 1, (N, words + 5), generator=g, dtype=torch.int32)\n"
        "    src2 = torch.randint(-2**31, 2**31 - 1, (N, words2 + 3), generator=g, dtype=torch.int32)\n"
        "    dest = torch.full((N, R), -1, dtype=torch.int32)\n"
        "    for d in range(R):\n"
        "        chosen = torch.rand(N, generator=g) < 0.6\n"
        "        dest[chosen, d] = torch.randperm(N, generator=g)[: int(chosen.sum())].int()\n"
        "    ws = torch.zeros(R * AREA, dtype=torch.int32)\n"
        "    deltas = torch.arange(R, dtype=torch.int64) * AREA\n"
        "    order = torch.randperm(N, generator=g).int()\n"
        "    extra = dict(WORDS2=words2, BLOCK2=16) if words2 else {}\n"
        "    push_rows_kernel[(3,)](src, dest, order, ws, deltas, region, N, src.stride(0), pitch, src2,\n"
        "                           src2.stride(0), REGION2, PITCH2, R=R, WORDS=words, ROWS=rows, BLOCK=block,\n"
        "                           SRC_ALIGNED=False, HAS_ORDER=bool(has_order), **extra)\n"
        "    want = torch.zeros_like(ws)\n"
        "    for i in range(N):\n"
        "        for d in range(R):\n"
        "            if dest[i, d] >= 0:\n"
        "                at = d * AREA + region + int(dest[i, d]) * pitch\n"
        "                want[at : at + words] = src[i, :words]\n"
        "                at = d * AREA + REGION2 + int(dest[i, d]) * PITCH2\n"
        "                want[at : at + words2] = src2[i, :words2]\n"
        "    assert torch.equal(ws, want), (words, rows, block, words2)\n"
    )
    _run_in_interpreter(code)


def test_pull_kernel_reads_rows_in_the_interpreter() -> None:
    # The pull kernel alone in Triton's CPU interpreter: three "ranks" are three areas of one tensor, processing
    # position p fills output row order[p] from a random row of a random rank's region; whole-row tiles with the
    # prefetch and rows wider than a tile, with and without a narrow companion read from its own region.
    code = (
        "import torch\n"
        "from deep_ep.kernels.triton_normal import pull_rows_kernel\n"
        "g = torch.Generator().manual_seed(0)\n"
        "R, M, AREA, REGION2, PITCH2 = 3, 11, 4096, 2048, 12\n"
        "cases = ((24, 4, 32, 28, 8), (40, 2, 16, 40, 0), (7, 8, 8, 8, 4))\n"
        "for (words, rows, block, pitch, region), words2 in zip(cases * 2, (0, 0, 0, 5, 9, 1)):\n"
        "    ws = torch.randint(-2**31, 2**31 - 1, (R * AREA,), generator=g, dtype=torch.int32)\n"
        "    deltas = torch.arange(R, dtype=torch.int64) * AREA\n"
        "    peer = torch.randint(0, R, (M,), generator=g).int()\n"
        "    src_row = torch.randint(0, 6, (M,), generator=g).int()\n"
        "    order = torch.randperm(M, generator=g).int()\n"
        "    out = torch.zeros(M, words + 3, dtype=torch.int32)\n"
        "    out2 = torch.zeros(M, words2 + 2, dtype=torch.int32)\n"
        "    extra = dict(WORDS2=words2, BLOCK2=16) if words2 else {}\n"
        "    pull_rows_kernel[(2,)](out, order, deltas[peer.long()], src_row, ws, region, M, out.stride(0), pitch,\n"
        "                           out2, out2.stride(0), REGION2, PITCH2, WORDS=words, ROWS=rows, BLOCK=block,\n"
        "                           OUT_ALIGNED=False, **extra)\n"
        "    want, want2 = torch.zeros_like(out), torch.zeros_like(out2)\n"
        "    for p, j in enumerate(order.tolist()):\n"
        "        at = int(peer[p]) * AREA + region + int(src_row[p]) * pitch\n"
        "        want[j, :words] = ws[at : at + words]\n"
        "        at = int(peer[p]) * AREA + REGION2 + int(src_row[p]) * PITCH2\n"
        "        want2[j, :words2] = ws[at : at + words2]\n"
        "    assert torch.equal(out, want) and torch.equal(out2, want2), (words, rows, block, words2)\n"
    )
    _run_in_interpreter(code)


def _counted(recv_x: torch.Tensor, recv_count: torch.Tensor) -> list[torch.Tensor]:
    """A low-latency dispatch's counts and its rows that hold tokens (rows past recv_count are unspecified)."""
    return [recv_count, torch.cat([rows[:count] for rows, count in zip(recv_x, recv_count.tolist())])]


def _sim_edge_cases(rank: int, world: int) -> list[str]:
    """Cases reviews found (EMULATION: symmetric memory as shared files, kernels in Triton's interpreter),
    each run on `reference` and on `cuda_sim` and compared bit for bit; returns the cases that ran."""
    from deep_ep.testing import symm_mem_emulation

    symm_mem_emulation.register()
    gen = torch.Generator().manual_seed(rank)
    results: dict[str, dict[str, list[torch.Tensor]]] = {}

    def record(case: str, backend: str, *tensors: torch.Tensor) -> None:
        results.setdefault(case, {})[backend] = [t.clone() for t in tensors]

    x16 = torch.randn(6, 16, generator=gen).bfloat16()
    odd = torch.zeros(6 * 16 + 1, dtype=torch.bfloat16)[1:].view(6, 16)  # rows 32 bytes wide, 2 bytes off 4
    odd.copy_(x16)
    big = torch.randn(6, 512, generator=gen).bfloat16()
    small = torch.randn(6, 4, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(t))[:2] for t in range(4)])
    ll_x = torch.randn(4, 128, generator=gen).bfloat16()
    for backend in ("reference", "cuda_sim"):
        # 1. The Buffer's first call moves nothing at all (every entry -1).
        buffer = Buffer(dist.group.WORLD, backend=backend)
        none = torch.full((6, 2), -1, dtype=torch.long)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(none, 4)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        got = buffer.dispatch(x16, topk_idx=none, topk_weights=torch.ones(6, 2), **layout)
        record("nothing sent", backend, got[0], got[1], got[2])
        # 2. x and the combine's input contiguous but 2 bytes past 4-byte alignment.
        idx = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(t))[:2] for t in range(6)])
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        recv_x, _, _, _, handle, _ = buffer.dispatch(odd, **layout)
        shifted = torch.zeros(recv_x.numel() + 1, dtype=recv_x.dtype)[1:].view(recv_x.shape)
        shifted.copy_(recv_x)
        record("odd offsets", backend, recv_x, buffer.combine(shifted, handle)[0])
        # 3. Three fresh dispatches with async_finish, the first one's event waited last (CPU: deferred unpacking).
        weights = [torch.rand(6, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        calls = [
            buffer.dispatch(x16 * (i + 1), topk_idx=idx, topk_weights=weights[i], async_finish=True, **layout)
            for i in range(3)
        ]
        for call in calls[::-1]:
            call[5].current_stream_wait()
        record("async fields", backend, calls[0][1], calls[0][2], calls[0][4][3])
        # 4. A low-latency layout change on one workspace (E 2 -> 4): the new flags lie on the old messages.
        ll = Buffer(dist.group.WORLD, low_latency_mode=True, backend=backend)
        for experts, topk in ((2, torch.zeros(4, 1, dtype=torch.long)),) * 2 + ((4, torch.full((4, 1), -1)),):
            x = torch.randn(4, 128, generator=torch.Generator().manual_seed(experts)).bfloat16()
            recv, count, ll_handle, _, _ = ll.low_latency_dispatch(x, topk, 4, experts, use_fp8=False)
            ll.low_latency_combine(recv, topk, torch.ones(4, 1), ll_handle)
        record("low-latency layout change", backend, count)
        # 5. Low-latency x and combine input 2 bytes off a word; a one-token x with an odd row stride.
        shifted_x = torch.zeros(ll_x.numel() + 1, dtype=ll_x.dtype)[1:].view(ll_x.shape)
        shifted_x.copy_(ll_x)
        recv, count, ll_handle, _, _ = ll.low_latency_dispatch(shifted_x, ids, 4, 4, use_fp8=False)
        y = recv * 2
        shifted_y = torch.zeros(y.numel() + 1, dtype=y.dtype)[1:].view(y.shape)
        shifted_y.copy_(y)
        combined = ll.low_latency_combine(shifted_y, ids, torch.ones(4, 2), ll_handle)[0]
        one_row = torch.zeros(1, 131, dtype=ll_x.dtype).as_strided((1, 128), (131, 1), 1)
        one_row.copy_(ll_x[:1])
        got = ll.low_latency_dispatch(one_row, ids[:1], 4, 4, use_fp8=False)
        record("low-latency odd offsets", backend, *_counted(recv, count), combined, *_counted(got[0], got[1]))
        # 6. Two low-latency calls with async_finish in flight (CPU: receives deferred to the events), then a call
        # that changes the layout (zeroing the workspace), and only then their events, the first one's last.
        first = ll.low_latency_dispatch(ll_x, ids, 4, 4, use_fp8=False, async_finish=True)
        second = ll.low_latency_dispatch(ll_x * 2, ids, 4, 4, use_fp8=False, async_finish=True)
        third = ll.low_latency_dispatch(ll_x[:, :64].contiguous(), ids, 4, 4, use_fp8=False)
        second[3].current_stream_wait()
        first[3].current_stream_wait()
        record(
            "low-latency calls in flight",
            backend,
            *_counted(first[0], first[1]),
            *_counted(second[0], second[1]),
            *_counted(third[0], third[1]),
        )
        # 7. A column-major is_token_in_rank (same values, strides (1, N)), then its handle's cached dispatch
        # and combine.
        column_major = dict(layout, is_token_in_rank=layout["is_token_in_rank"].t().contiguous().t())
        recv_x, _, _, _, handle, _ = buffer.dispatch(x16, **column_major)
        again = buffer.dispatch(x16, handle=handle)[0]
        record("column-major mask", backend, recv_x, handle[3], again, buffer.combine(recv_x, handle)[0])
        # 9. One rank without tokens whose empty x sits 2 bytes off a word (normal and low-latency dispatch), and a
        # rank that received no rows combining an empty view 2 bytes off a word.
        flat = torch.zeros(2 * 128 + 1, dtype=torch.bfloat16)
        mine = x16 if rank == 0 else flat[1:1].view(0, 16)
        own_ids = torch.stack([torch.randperm(2, generator=torch.Generator().manual_seed(t))[:1] for t in range(6)])
        own_ids = own_ids[: mine.shape[0]]  # every token to rank 0's experts: rank 1 receives nothing
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(own_ids, 4)
        only_zero = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        recv_x, _, _, _, handle, _ = buffer.dispatch(mine, **only_zero)
        back = recv_x if rank == 0 else flat[1:1].view(0, 16)
        ll_mine = ll_x if rank == 0 else flat[1:1].view(0, 128)
        got = ll.low_latency_dispatch(ll_mine, ids[: ll_mine.shape[0]], 4, 4, use_fp8=False)
        record("empty inputs off a word", backend, recv_x, buffer.combine(back, handle)[0], *_counted(got[0], got[1]))
        # 8. Two new Buffers on one group with workspaces of different sizes, used in turn.
        one, other = Buffer(dist.group.WORLD, backend=backend), Buffer(dist.group.WORLD, backend=backend)
        first = one.dispatch(big, **layout)[0]
        second = other.dispatch(small, **layout)[0]
        record("two Buffers", backend, first, second, one.dispatch(big, **layout)[0])
        dist.barrier()
    for case, got in results.items():
        for i, (want, have) in enumerate(zip(got["reference"], got["cuda_sim"])):
            assert_bit_equal(f"{case} [{i}] (EMULATED cuda vs reference)", have, want)
    return sorted(results)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed (an extra check)")
def test_review_cases_on_the_emulated_backend(tmp_path) -> None:
    """EMULATION of symmetric memory; the backend and its kernels are the real ones."""
    env = {DIRECTORY_ENV: str(tmp_path), "TRITON_INTERPRET": "1"}
    results = run_ranks(2, _sim_edge_cases, env=env, timeout=280)
    assert results[0] == sorted(
        [
            "nothing sent",
            "odd offsets",
            "async fields",
            "low-latency layout change",
            "low-latency odd offsets",
            "low-latency calls in flight",
            "column-major mask",
            "empty inputs off a word",
            "two Buffers",
        ]
    )


# ---- a fresh dispatch's bookkeeping kernels against the reference's torch operations --------------------------
def _mask_layouts(mask: torch.Tensor) -> list[torch.Tensor]:
    """The same values as a dense, a column-major and a strided (every other column of a wider one) tensor."""
    wide = torch.zeros(mask.shape[0], 2 * mask.shape[1], dtype=torch.bool)
    wide[:, ::2] = mask
    return [mask, mask.t().contiguous().t(), wide[:, ::2]]


def _exchanged_rows(masks: list[torch.Tensor], num_channels: int) -> list[list[int]]:
    """Each rank's row of the count exchange as the reference reads it on the host: tokens per destination, then
    per (destination, channel)."""
    rows = []
    for mask in masks:
        channel = channel_of_tokens(mask.shape[0], num_channels, torch.device("cpu"))
        per_channel = torch.zeros(mask.shape[1], num_channels, dtype=torch.long)
        per_channel.index_add_(1, channel, mask.t().long())
        rows.append(mask.sum(0).tolist() + per_channel.view(-1).tolist())
    return rows


def _bookkeeping_cases(rank: int, world: int) -> int:
    """EMULATION host (kernels in Triton's interpreter): the cuda backend's `_count_row`, `_exact_route` and `_unpack`
    against the reference backend's, bit for bit, over random masks, token counts across the kernel's 1024-token
    blocks, channel counts, mask layouts, id dtypes and packed formats. Returns the cases compared."""
    from deep_ep.testing import symm_mem_emulation

    symm_mem_emulation.register()
    group = dist.group.WORLD
    ref, sim = deep_ep.Buffer(group, backend="reference").runtime, deep_ep.Buffer(group, backend="cuda_sim").runtime
    gen, compared = torch.Generator().manual_seed(7), 0
    for num_tokens, num_channels, density in [(1, 1, 0.5), (37, 3, 0.3), (1024, 10, 0.6), (2500, 12, 0.2)]:
        sizes = [num_tokens + 5 * r for r in range(world)]  # every rank draws every rank's mask: same counts
        masks = [torch.rand(n, world, generator=gen) < density for n in sizes]
        rows = _exchanged_rows(masks, num_channels)
        counts = torch.tensor([row[:world] for row in rows])
        matrices = _host_prefix_matrices(rows, rank, num_channels, torch.device("cpu"))
        channel = channel_of_tokens(sizes[rank], num_channels, torch.device("cpu"))
        for mask in _mask_layouts(masks[rank]):
            args = (mask, counts, matrices[0], channel, matrices[4], sizes)
            (want, want_head), (got, got_head) = ref._exact_route(*args), sim._exact_route(*args)
            assert_bit_equal("send_head (EMULATED kernel)", got_head, want_head)
            assert_bit_equal("send_tokens (EMULATED kernel)", got.send_tokens, want.send_tokens)
            assert (got.send_splits, got.recv_splits, got.num_recv) == (
                want.send_splits,
                want.recv_splits,
                want.num_recv,
            )
            plan = dispatch_push_plan(counts.tolist(), rank, mask)
            assert_bit_equal("push plan dest (EMULATED kernel)", got.cache["cuda_dispatch_plan"].dest, plan.dest)
            compared += 1
        _compare_unpack(ref, sim, want, gen, rank, world)
        compared += _compare_count_rows(ref, sim, masks[rank], num_channels, gen)
    return compared


def _compare_count_rows(ref, sim, mask: torch.Tensor, num_channels: int, gen: torch.Generator) -> int:
    """Both backends' row of the count exchange for the same inputs: mask layouts, count tensors of either dtype
    and strided, ids of either dtype, column-major, with -1 and out-of-range ids (clamped), or no ids at all."""
    num_tokens, num_ranks = mask.shape
    num_experts = 4 * num_ranks
    ids = torch.randint(-1, num_experts, (num_tokens, 3), generator=gen)
    wild = ids.clone()
    if num_tokens > 1:
        wild[0, 0], wild[-1, 2] = -5, (1 << 40)  # beyond [-1, E): the row carries them clamped to [-2, E]
    strided = torch.arange(2 * num_experts)[::2]  # a per-expert count tensor with stride 2
    variants = [
        (mask, mask.sum(0).int(), strided, ids),
        (mask.t().contiguous().t(), mask.sum(0), strided.int(), ids.int().t().contiguous().t()),
        (_mask_layouts(mask)[2], mask.sum(0).repeat_interleave(2)[::2], strided, wild),  # per_rank: stride 2
        (mask, mask.sum(0), strided, torch.full_like(ids, num_experts + 7)),  # every id above E: both clamp to E
        (mask, mask.sum(0).int(), strided.int(), None),
        (mask[:0], torch.zeros(num_ranks, dtype=torch.int32), strided, ids[:0]),
    ]
    channel = channel_of_tokens(num_tokens, num_channels, torch.device("cpu"))
    for in_rank, per_rank, per_expert, topk_idx in variants:
        weights = None if topk_idx is None else torch.ones(topk_idx.shape)
        x = torch.zeros(in_rank.shape[0], 8)
        args = DispatchArgs(x, None, per_rank, in_rank, per_expert, topk_idx, weights, 1, 0, num_channels)
        here = channel if in_rank.shape[0] == num_tokens else channel[:0]
        assert_bit_equal("count row (EMULATED kernel)", sim._count_row(args, here), ref._count_row(args, here))
    return len(variants)


def _compare_unpack(ref, sim, route: Route, gen: torch.Generator, rank: int, world: int) -> None:
    """Both backends' unpack of the same received rows (in a pitch wider than a row, as in the workspace): ids
    spanning every rank's experts and -1, weights with NaN and -0.0, with and without fp8 scales."""
    experts_per_rank, rows = 4, max(route.num_recv, 1)
    for idx_dtype, scales_cols in [(torch.int64, 0), (torch.int32, 3), (torch.int64, 1)]:
        idx = torch.randint(-1, experts_per_rank * world, (rows, 5), generator=gen).to(idx_dtype)
        weights = torch.randn(rows, 5, generator=gen)
        weights[0, :2] = torch.tensor([float("nan"), -0.0])
        if idx_dtype == torch.int64:  # low word in this rank's range, high word not: not one of its experts
            idx[-1, 0] = (1 << 32) + rank * experts_per_rank
        scales = torch.randn(rows, scales_cols, generator=gen) if scales_cols else None
        fields = dict(scales=scales, topk_idx=idx, topk_weights=weights, src=torch.randperm(rows).int())
        fmt = RowFormat.of(**fields)
        if fmt.width % 8:
            fields["pad"] = torch.zeros(rows, -fmt.width % 8, dtype=torch.uint8)
            fmt = RowFormat.of(**fields)
        workspace = torch.zeros(rows, fmt.width + 16, dtype=torch.uint8)
        workspace[:, : fmt.width] = fmt.pack(**fields)
        received = workspace[:, : fmt.width]
        outs = []
        for backend in (ref, sim):
            out = {
                "recv_x_scales": None if scales is None else torch.empty_like(scales),
                "recv_topk_idx": torch.empty_like(idx),
                "recv_topk_weights": torch.empty_like(weights),
                "handle": [None, None, None, torch.empty(rows, dtype=torch.int32)],
            }
            backend._unpack(fmt, received, out, route, experts_per_rank)
            outs.append([out["recv_topk_idx"], out["recv_topk_weights"], out["handle"][3], out["recv_x_scales"]])
        for name, got, want in zip(("topk_idx", "topk_weights", "src", "scales"), outs[1], outs[0]):
            assert_bit_equal(f"unpacked {name} (EMULATED kernel)", got, want)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed (an extra check)")
def test_fresh_dispatch_bookkeeping_kernels_match_the_reference(tmp_path) -> None:
    """EMULATION of symmetric memory (the kernels run in Triton's interpreter; the code is the backend's own)."""
    env = {DIRECTORY_ENV: str(tmp_path), "TRITON_INTERPRET": "1"}
    assert run_ranks(3, _bookkeeping_cases, env=env, timeout=280) == [36, 36, 36]
