"""`run_ranks` runs the caller's copy of deep_ep on every rank, or refuses: an A/B benchmark of two checkouts must
not silently measure the installed one twice. A rank that dies without reporting is named with its exit code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from deep_ep.testing import RankFailure, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = "def where(rank, world):\n    import deep_ep\n    return deep_ep.__file__\n"
_CALLER = (
    "import sys\n"
    "sys.path.insert(0, {copy!r})\n"
    "import deep_ep\n"
    "from deep_ep.testing import run_ranks\n"
    "import probe\n"
    "assert deep_ep.__file__.startswith({copy!r}), deep_ep.__file__\n"
    "print(run_ranks(2, probe.where, timeout=60))\n"
)


def _caller_with_a_copy(tmp_path, cwd: str) -> subprocess.CompletedProcess:
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(ROOT, "deep_ep"), copy / "deep_ep", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "probe.py").write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = _CALLER.format(copy=str(copy))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_ranks_import_the_callers_copy_of_deep_ep(tmp_path) -> None:
    done = _caller_with_a_copy(tmp_path, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(str(tmp_path / "copy" / "deep_ep" / "__init__.py")) == 2, done.stdout


def test_ranks_refuse_another_deep_ep_found_first(tmp_path) -> None:
    # From the repository root, the forkserver's `import deep_ep` finds the root's package before the copy.
    done = _caller_with_a_copy(tmp_path, cwd=ROOT)
    assert done.returncode != 0
    assert f"this rank imported deep_ep from {ROOT}, the caller from {tmp_path / 'copy'}" in done.stderr, done.stderr


def _exit_three(rank: int, world: int) -> None:
    os._exit(3)


def test_a_rank_that_exits_is_reported_with_its_exit_code() -> None:
    with pytest.raises(RankFailure, match=r"\[rank 0\] process exited with code 3 before reporting"):
        run_ranks(1, _exit_three, timeout=60)
