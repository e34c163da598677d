"""The host C kernel of the combine's ordered sum (`deep_ep.kernels.host_ordered_sum`) == the torch
implementation, bit for bit; its index checks; and what happens where it cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from deep_ep.kernels import host_ordered_sum
from deep_ep.kernels.ordered_sum import ordered_gather_sum, torch_ordered_gather_sum
from deep_ep.testing.compare import assert_bit_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_kernel_is_built_wherever_a_c_compiler_is() -> None:
    # CI has gcc: a build that silently fails must not leave the suite testing only the torch path.
    rows = torch.zeros(1, 1, dtype=torch.bfloat16)
    if os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"):
        assert host_ordered_sum.usable(rows), host_ordered_sum.status()
        assert host_ordered_sum.status().startswith("c ("), host_ordered_sum.status()
    else:
        assert not host_ordered_sum.usable(rows)
        assert "no C compiler" in host_ordered_sum.status()
    assert not host_ordered_sum.usable(rows.float())  # bf16 only: other dtypes take the torch path


def _hard_bf16(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """bf16 values, half of a few nearby exponents (so float32 sums often land exactly halfway between two bf16
    values), half spread over 2^-27..2^23 (so float32 sums round, and their order shows), with signed zeros,
    infinities and a few NaN."""
    mantissa = torch.randint(0, 128, shape, generator=gen, dtype=torch.int32)
    nearby = torch.rand(shape, generator=gen) < 0.5
    exponent = torch.where(
        nearby,
        torch.randint(120, 127, shape, generator=gen, dtype=torch.int32),
        torch.randint(100, 150, shape, generator=gen, dtype=torch.int32),
    )
    sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.int32)
    bits = (sign << 15) | (exponent << 7) | mantissa
    special = torch.rand(shape, generator=gen)
    bits = torch.where(special < 0.05, sign << 15, bits)  # +-0.0
    bits = torch.where((special > 0.999) & (special < 0.9995), (sign << 15) | 0x7F80, bits)  # +-inf
    bits = torch.where(special >= 0.9995, 0x7FC1, bits)  # NaN
    return bits.to(torch.int16).view(torch.bfloat16)


def _ties_and_order(rows: torch.Tensor, row_index: torch.Tensor) -> tuple[int, int]:
    """How many output elements are float32 sums exactly halfway between two bf16 values (where
    round-to-nearest-even and other roundings differ), and how many float32 sums change when the sources are
    added in the reverse order."""
    terms = []
    for d in range(row_index.shape[1]):
        index = row_index[:, d].long()
        terms.append(torch.where((index >= 0).unsqueeze(1), rows[index.clamp(min=0)].float(), 0.0))
    forward, backward = torch.zeros(row_index.shape[0], rows.shape[1]), torch.zeros(row_index.shape[0], rows.shape[1])
    for term, reversed_term in zip(terms, reversed(terms)):
        forward, backward = forward + term, backward + reversed_term
    ties = int(((forward.view(torch.int32) & 0xFFFF) == 0x8000).sum())
    order = int((forward.view(torch.int32) != backward.view(torch.int32)).sum())
    return ties, order


@pytest.mark.parametrize("hidden", [1, 7, 32, 33, 95, 7168])
def test_c_kernel_equals_the_torch_sum_bit_for_bit(hidden: int) -> None:
    assert host_ordered_sum.usable(torch.zeros(1, 1, dtype=torch.bfloat16)), host_ordered_sum.status()
    gen = torch.Generator().manual_seed(hidden)
    ties = order = 0
    for num_tokens, num_sources in [(0, 2), (1, 1), (37, 4), (16, 7)]:
        pitch = hidden + 3  # rows as strided views of wider rows, as the workspace holds them
        rows = _hard_bf16((3 * num_tokens + 2, pitch), gen)[:, :hidden]
        row_index = torch.randint(-1, rows.shape[0], (num_tokens, num_sources), generator=gen, dtype=torch.int32)
        biases = tuple(_hard_bf16((num_tokens, hidden), gen) for _ in range(2))
        found = _ties_and_order(rows, row_index)
        ties, order = ties + found[0], order + found[1]
        for nb in range(3):
            want = torch_ordered_gather_sum(rows, row_index, biases[:nb])
            got = host_ordered_sum.ordered_gather_sum(rows, row_index, biases[:nb])
            assert_bit_equal(f"{num_tokens}x{hidden}, {num_sources} sources, {nb} biases", got, want)
            # The dispatcher takes the C kernel for these rows, and writes into `out` of any strides.
            for out in (
                torch.empty(num_tokens, hidden, dtype=torch.bfloat16),
                torch.empty(hidden, num_tokens, dtype=torch.bfloat16).t(),
            ):
                assert ordered_gather_sum(rows, row_index, biases[:nb], out=out) is out
                assert_bit_equal("into out", out, want)
            # One source's rows read from a tensor of their own (a rank's rows to itself, where they are).
            d = num_tokens % num_sources
            own_rows = torch.cat([_hard_bf16((5, hidden), gen), rows])
            own_index = row_index.clone()
            own_index[:, d] = torch.where(row_index[:, d] >= 0, row_index[:, d] + 5, -1)
            got = host_ordered_sum.ordered_gather_sum(rows, own_index, biases[:nb], own=(d, own_rows))
            assert_bit_equal(f"{num_tokens}x{hidden}, own source {d}", got, want)
    if hidden >= 32:  # the rounding of exact halves, and the order of additions, were exercised
        assert ties > 0 and order > 0, (ties, order)


def test_c_kernel_refuses_rows_outside_the_index_range() -> None:
    rows = torch.randn(6, 8).bfloat16()
    for bad in (6, -2):
        row_index = torch.tensor([[0, 1], [2, bad]], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"row_index: column 1 holds rows outside \[-1, 6\)"):
            host_ordered_sum.ordered_gather_sum(rows, row_index)
    # The own column is checked against the own rows, not against `rows`.
    row_index = torch.tensor([[0, 4], [2, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"column 1 holds rows outside \[-1, 3\)"):
        host_ordered_sum.ordered_gather_sum(rows, row_index, own=(1, rows[:3]))
    # Own rows elsewhere than the rows (a pointer the C code must not get) are refused before any index check.
    with pytest.raises(ValueError, match=r"own: rows must be torch.bfloat16 \[M, 8\] on cpu"):
        ordered_gather_sum(rows, row_index, own=(1, torch.empty(3, 8, dtype=torch.bfloat16, device="meta")))
    good = torch.tensor([[0, 2], [2, -1]], dtype=torch.int32)
    want = torch_ordered_gather_sum(rows, good, own=(1, rows[:3]))
    assert_bit_equal("after refusals", host_ordered_sum.ordered_gather_sum(rows, good, own=(1, rows[:3])), want)


@pytest.mark.parametrize(
    "env,why",
    [
        ({"CC": "/nonexistent/cc"}, "failed"),
        ({"CC": sys.executable}, "failed"),  # a "compiler" that exits non-zero
        ({"DEEP_EP_HOST_KERNEL": "0"}, "DEEP_EP_HOST_KERNEL=0"),
    ],
)
def test_without_the_kernel_the_torch_sum_runs_and_status_says_why(tmp_path, env: dict, why: str) -> None:
    code = (
        "import torch\n"
        "from deep_ep.kernels import host_ordered_sum as h\n"
        "from deep_ep.kernels.ordered_sum import ordered_gather_sum, torch_ordered_gather_sum\n"
        "rows = torch.randn(9, 40).bfloat16()\n"
        "index = torch.randint(-1, 9, (5, 3), dtype=torch.int32)\n"
        "assert not h.usable(rows)\n"
        "got, want = ordered_gather_sum(rows, index), torch_ordered_gather_sum(rows, index)\n"
        "assert torch.equal(got.view(torch.int16), want.view(torch.int16))\n"
        "print(h.status())\n"
    )
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    run_env = dict(os.environ, PYTHONPATH=path, DEEP_EP_CACHE_DIR=str(tmp_path), **env)
    done = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("torch (") and why in done.stdout, done.stdout


def test_a_read_only_home_builds_in_a_temp_directory() -> None:
    code = "from deep_ep.kernels import host_ordered_sum as h\nprint(h.status())\n"
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k not in ("DEEP_EP_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(PYTHONPATH=path, HOME="/proc")  # ~/.cache cannot be created under /proc
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if shutil.which("cc") or shutil.which("gcc") or os.environ.get("CC"):
        assert done.stdout.startswith(f"c ({tempfile.gettempdir()}/deep_ep-"), done.stdout
    else:
        assert "no C compiler" in done.stdout, done.stdout


def _status_in_a_new_process(env: dict, code: str = "print(h.status())\n") -> str:
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    run_env = dict(os.environ, PYTHONPATH=path, **env)
    script = "from deep_ep.kernels import host_ordered_sum as h\n" + code
    done = subprocess.run([sys.executable, "-c", script], env=run_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


needs_compiler = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")), reason="checks the build, which needs a C compiler"
)


@needs_compiler
def test_a_cache_directory_others_may_write_is_not_used(tmp_path) -> None:
    # Someone else could plant a library there: it would run as this process.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    status = _status_in_a_new_process({"DEEP_EP_CACHE_DIR": str(shared)})
    assert status.startswith("torch (no cache directory") and not list(shared.iterdir()), status


@needs_compiler
def test_a_cached_library_that_is_foreign_stale_or_broken_is_rebuilt(tmp_path) -> None:
    env = {"DEEP_EP_CACHE_DIR": str(tmp_path)}
    first = _status_in_a_new_process(env)
    assert first.startswith("c ("), first
    target = first[len("c (") : -1]
    stale = tmp_path / "stale.c"
    stale.write_text("int something_else(void) { return 0; }\n")
    compiler = shutil.which("cc") or shutil.which("gcc")
    for damage in ("no entry point", "truncated", "others may write it"):
        if damage == "no entry point":
            subprocess.run([compiler, "-shared", "-fPIC", str(stale), "-o", target], check=True, timeout=60)
        elif damage == "truncated":
            with open(target, "wb") as broken:
                broken.write(b"\x7fELF")
        else:
            os.chmod(target, 0o666)
        status = _status_in_a_new_process(env)
        assert status == first, (damage, status)  # rebuilt in place, loaded
        assert not os.stat(target).st_mode & 0o022, damage


@needs_compiler
def test_threads_asking_at_once_get_one_library(tmp_path) -> None:
    code = (
        "import threading, torch\n"
        "rows = torch.zeros(1, 1, dtype=torch.bfloat16)\n"
        "got = []\n"
        "threads = [threading.Thread(target=lambda: got.append(h.usable(rows))) for _ in range(8)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(got.count(True), h.status())\n"
    )
    status = _status_in_a_new_process({"DEEP_EP_CACHE_DIR": str(tmp_path)}, code)
    assert status.startswith("8 c ("), status


@needs_compiler
def test_cc_with_arguments_is_split_as_a_shell_would() -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    with tempfile.TemporaryDirectory() as cache:
        status = _status_in_a_new_process({"DEEP_EP_CACHE_DIR": cache, "CC": f"{compiler} -O2"})
    assert status.startswith("c ("), status


def test_int64_row_indices_beyond_int32_are_refused() -> None:
    rows = torch.zeros(3, 4, dtype=torch.bfloat16)
    if not host_ordered_sum.usable(rows):
        pytest.skip(host_ordered_sum.status())
    index = torch.tensor([[1], [2**32 + 1]], dtype=torch.int64)  # would wrap to row 1 as int32
    with pytest.raises(ValueError, match="outside"):
        host_ordered_sum.ordered_gather_sum(rows, index)
