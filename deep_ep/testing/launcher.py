"""`run_ranks`: run a function on a fresh torch.distributed world of N local processes.

- forkserver start method with torch and deep_ep preloaded: a world costs milliseconds after the first,
  where `spawn` re-imports torch for seconds per process;
- rendezvous through a FileStore in a private temp dir (no ports to collide under pytest -n auto);
- one intra-op thread per rank (the ranks share the machine's cores);
- a child's traceback comes back to the parent prefixed with `[rank r]`; a deadline kills only this
  world's children, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import datetime
import multiprocessing
import multiprocessing.connection
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

_PRELOAD = ["torch", "torch.distributed", "deep_ep"]
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RankFailure(AssertionError):
    """One or more ranks raised, or the world missed its deadline; the message holds every rank's story."""


def _context() -> multiprocessing.context.BaseContext:
    # The forkserver that starts the ranks imports deep_ep by name from the interpreter's default sys.path (the
    # current directory, PYTHONPATH, site-packages), not from this process's (Python 3.11 ignores the path it is
    # handed): put the directory this deep_ep came from first on PYTHONPATH, so that a checkout other than the
    # installed one reaches the ranks too. `_rank_main` refuses to run a different one (a deep_ep in the current
    # directory still comes first).
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if paths[0] != _PACKAGE_ROOT:
        os.environ["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *filter(None, paths)])
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _rank_main(
    rank: int,
    world_size: int,
    store_path: str,
    backend: str,
    pg_timeout_s: float,
    env: dict[str, str],
    conn: multiprocessing.connection.Connection,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    caller_package_root: str,
) -> None:
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if _PACKAGE_ROOT != caller_package_root:
            raise RuntimeError(
                f"this rank imported deep_ep from {_PACKAGE_ROOT}, the caller from {caller_package_root}: the ranks "
                "start from a forkserver that imports deep_ep by name, the current directory first; run from a "
                "directory without another deep_ep"
            )
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout_s)
        )
        # gloo's mesh can be complete on one rank while a peer still finishes its handshake: a rank whose `fn`
        # needs no collective would otherwise tear the group down under that peer ("Connection closed by peer").
        dist.barrier()
        result = fn(rank, world_size, *args, **kwargs)
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
    doomed: tuple[int, ...] = (),
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on every rank of a new world; return the results by rank.

    `fn` and its arguments must be picklable (a module-level function). Raises `RankFailure` with every
    failing rank's traceback, or naming the ranks still running at the deadline (`timeout` seconds).
    `doomed`: ranks a test kills or stalls on purpose; their result is None, and once every other rank has
    reported they are killed instead of waited for.
    """
    ctx = _context()
    workdir = tempfile.mkdtemp(prefix="deep_ep_world_")
    store_path = os.path.join(workdir, "store")
    procs, conns = [], []
    try:
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_main,
                args=(
                    rank,
                    world_size,
                    store_path,
                    backend,
                    timeout,
                    dict(env or {}),
                    child_end,
                    fn,
                    args,
                    kwargs,
                    _PACKAGE_ROOT,
                ),
                name=f"deep_ep-rank{rank}",
                daemon=True,
            )
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
        return _collect(procs, conns, timeout, set(doomed))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)


def _collect(procs: list, conns: list, timeout: float, doomed: set[int]) -> list[Any]:
    deadline = time.monotonic() + timeout
    results: dict[int, tuple[str, Any]] = {rank: ("ok", None) for rank in doomed}
    waiting = dict(enumerate(conns))
    while set(waiting) - doomed:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if any(status == "error" for status, _ in results.values()):
            # A failed rank usually leaves its peers blocked in a collective: give them a moment, no more.
            deadline = min(deadline, time.monotonic() + 5.0)
        ready = multiprocessing.connection.wait(list(waiting.values()), timeout=min(remaining, 1.0))
        for conn in ready:
            rank = next(r for r, c in waiting.items() if c is conn)
            try:
                results[rank] = conn.recv()
            except EOFError:
                if rank not in doomed:
                    procs[rank].join(timeout=5)  # its pipe closes before it exits: no exitcode until joined
                    results[rank] = ("error", f"process exited with code {procs[rank].exitcode} before reporting\n")
            del waiting[rank]
    failures = [f"[rank {rank}] {body}" for rank, (status, body) in sorted(results.items()) if status == "error"]
    if set(waiting) - doomed:
        failures.append(f"ranks {sorted(set(waiting) - doomed)} did not finish within {timeout:g} s (killed)")
    if failures:
        raise RankFailure("\n".join(failures))
    return [results[rank][1] for rank in range(len(procs))]
