"""The host board (deep_ep/host_board.py): ranks of one machine swap agreement rows through shared memory.

Real gloo worlds of local processes; the board is the code under test, nothing is emulated.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from deep_ep import Buffer, CollectiveMismatchError, CommTimeoutError
from deep_ep.comm import Comm
from deep_ep.host_board import HostBoard, board_supported
from deep_ep.testing import run_ranks
from deep_ep.testing.compare import assert_bit_equal


def _rows_under_skew(rank: int, world: int, calls: int) -> int:
    comm = Comm(dist.group.WORLD)  # the board's owner (the board holds it weakly)
    board = HostBoard.open(comm)
    assert board is not None
    jitter = random.Random(rank)
    for call in range(1, calls + 1):
        if jitter.random() < 0.3:  # ranks arrive out of step, sometimes a whole call apart
            time.sleep(jitter.random() * 2e-3)
        size = 1 + call % 5  # payloads change size from call to call
        if call % 3:  # tensors (the dispatch counts) and int rows (the agreement) share the calls
            mine = torch.arange(size, dtype=torch.int32) + 1000 * call + rank
            rows = board.all_gather(mine, "call")
            expected = torch.stack([torch.arange(size, dtype=torch.int32) + 1000 * call + r for r in range(world)])
            assert rows.dtype == torch.int32 and torch.equal(rows, expected), (call, rows)
        else:
            rows = board.all_gather_ints([-call, rank] + [2**40 + call] * size, "call")
            assert rows == [[-call, r] + [2**40 + call] * size for r in range(world)], (call, rows)
    with pytest.raises(CollectiveMismatchError, match="payloads of different sizes"):
        board.all_gather(torch.zeros(1 + rank, dtype=torch.int64), "uneven call")
    with pytest.raises(CollectiveMismatchError, match="payloads of different sizes"):
        board.all_gather_ints([0] * (1 + rank), "uneven call")
    board.close()
    return calls


def test_board_hands_every_rank_the_rows_of_the_same_call() -> None:
    assert board_supported(), "this suite runs on x86-64, where the board is used"
    assert run_ranks(3, _rows_under_skew, 400, timeout=120) == [400] * 3


def _agreement_path(rank: int, world: int, disable_on: int) -> tuple[bool, str]:
    if rank == disable_on:
        os.environ["DEEP_EP_HOST_BOARD"] = "0"
    buffer = Buffer(dist.group.WORLD)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    idx = torch.tensor([[0], [1], [0], [1]]) if world == 2 else torch.zeros(4, 1, dtype=torch.int64)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 2 * world)
    with pytest.raises(CollectiveMismatchError) as info:
        buffer.dispatch(x[:, : 32 if rank == 0 else 64].contiguous(), None, per_rank, None, in_rank, per_expert)
    # The Buffer still agrees and moves data after the mismatch.
    recv_x, *_, handle, _ = buffer.dispatch(x, None, per_rank, None, in_rank, per_expert)
    back, _, _ = buffer.combine(recv_x, handle)
    expected = (x.float() * in_rank.sum(1, keepdim=True)).to(torch.bfloat16)
    assert_bit_equal("combine of an unweighted dispatch", back, expected)
    return buffer._comm.board is not None, str(info.value)


@pytest.mark.parametrize("disable_on", [-1, 0, 1], ids=["board", "off-on-rank0", "off-on-rank1"])
def test_agreement_over_the_board_or_the_group(disable_on: int) -> None:
    results = run_ranks(2, _agreement_path, disable_on)
    # One rank without the board puts every rank on the group; the check raises alike either way.
    assert [used for used, _ in results] == [disable_on == -1] * 2
    assert all("hidden: rank 0=32, rank 1=64" in message for _, message in results), results


def _absent_rank(rank: int, world: int) -> str | None:
    buffer = Buffer(dist.group.WORLD)
    callers = dist.new_group(list(range(world - 1)))  # every rank takes part in making a group
    if rank == world - 1:
        time.sleep(120)  # alive, but never calls (killed once the others report)
        return None
    buffer.comm_timeout = 6.0  # a caller descheduled for seconds on a loaded 2-core machine is not taken for absent
    # The callers start together, so on a loaded machine a slow start cannot pass for the absent rank.
    dist.barrier(group=callers)
    start = time.monotonic()
    with pytest.raises(CommTimeoutError, match="combine") as info:
        buffer._agree(
            "combine", hidden=1, x_dtype=0, num_topk=0, num_worst_tokens=0, handle_serial=0, on_buffer_device=1
        )
    assert time.monotonic() - start < 20
    return str(info.value)


def test_a_rank_that_never_arrives_times_out_naming_the_op() -> None:
    messages = run_ranks(3, _absent_rank, doomed=(2,), timeout=60)
    assert all("ranks [2] did not reach" in m for m in messages[:2]), messages


def _rank_that_exits(rank: int, world: int) -> str | None:
    buffer = Buffer(dist.group.WORLD)
    if rank == world - 1:
        os._exit(0)  # gone before the call: the others must not wait out comm_timeout
    start = time.monotonic()
    with pytest.raises(CommTimeoutError) as info:
        buffer._agree(
            "combine", hidden=1, x_dtype=0, num_topk=0, num_worst_tokens=0, handle_serial=0, on_buffer_device=1
        )
    assert time.monotonic() - start < 30, "a dead rank was waited for as if it were slow"
    assert buffer.comm_timeout >= 300  # the default: the exit was noticed, not the timeout
    return str(info.value)


def test_a_rank_that_exited_is_noticed_before_the_timeout() -> None:
    messages = run_ranks(3, _rank_that_exits, doomed=(2,), timeout=90)
    # The first rank to notice gives the call up: the other may see that before it looks itself.
    assert all("ranks [2] went away" in m or "ranks [2] did not reach" in m for m in messages[:2]), messages
    assert any("ranks [2] went away" in m for m in messages[:2]), messages


def _posts_then_exits(rank: int, world: int) -> list[list[int]] | None:
    from deep_ep import host_board

    comm = Comm(dist.group.WORLD)  # the board's owner (the board holds it weakly)
    board = HostBoard.open(comm)
    assert board is not None
    if rank == 1:
        time.sleep(0.3)  # rank 0 is waiting already and has seen this rank's slot unposted
        board.all_gather_ints([rank], "call")
        os._exit(0)  # posted, read rank 0's post, gone: a finished peer, not a dead one
    look = host_board._process_gone

    def look_once_it_exited(pid: int) -> bool:  # timing only: the look lands after the peer posted and exited
        while not look(pid):
            time.sleep(0.01)
        return True

    host_board._process_gone = look_once_it_exited
    try:
        return board.all_gather_ints([rank], "call")
    finally:
        host_board._process_gone = look


def test_a_rank_that_posted_and_exited_is_not_taken_for_dead() -> None:
    # Between reading which slots are unposted and looking at the processes, a peer may post and exit: the
    # waiter must read its slot again rather than report it gone (seen once in CI, on a busy two-core machine).
    results = run_ranks(2, _posts_then_exits, doomed=(1,), timeout=60)
    assert results[0] == [[0], [1]], results


def _pids_across_namespaces(rank: int, world: int) -> list[int] | None:
    from deep_ep import host_board

    if rank == 1:  # as a rank in another container that shares /dev/shm: its PID means another process here
        host_board._pid_namespace = lambda: (1, 4026531836)
    board = HostBoard.open(Comm(dist.group.WORLD))
    assert board is not None
    return board._pids


def test_ranks_in_different_pid_namespaces_are_not_watched_by_pid() -> None:
    # Before the fix rank 0 watched rank 1's PID as if it named a process of its own namespace (seen for real
    # with `unshare --pid`: rank 1 was PID 1 there, rank 0's init here): a dead rank went unnoticed, and the exit
    # of whatever process the PID named here was taken for rank 1's.
    assert run_ranks(2, _pids_across_namespaces) == [None, None]


def _taken_for_gone(rank: int, world: int) -> list[str]:
    """Rank 0 takes rank 1 for gone (as a PID that names another, exited process would make it); rank 1 then
    comes after all."""
    from deep_ep import host_board

    comm = Comm(dist.group.WORLD)
    board = HostBoard.open(comm)
    assert board is not None
    outcomes = []
    if rank == 0:
        peer = board._pids[1]
        look = host_board._process_gone
        host_board._process_gone = lambda pid: pid == peer or look(pid)
    else:
        dist.barrier()  # rank 1 comes only once rank 0 has raised
    for call in range(2):
        try:
            outcomes.append(str(board.all_gather_ints([rank, call], "call")))
        except CommTimeoutError as error:
            outcomes.append("went away" if "went away" in str(error) else "gave up")
        if rank == 0 and call == 0:
            host_board._process_gone = look
            dist.barrier()
    board.close()
    return outcomes


def test_a_rank_taken_for_gone_that_still_comes_fails_the_same_call() -> None:
    # Before the fix rank 0 raised without marking the call given up: rank 1 came, found rank 0's post and
    # returned the rows, so the two ranks disagreed on whether the call happened.
    assert run_ranks(2, _taken_for_gone, timeout=60) == [
        ["went away", "[[0, 1], [1, 1]]"],
        ["gave up", "[[0, 1], [1, 1]]"],
    ]


def _stalled_reader(rank: int, world: int) -> list[str]:
    """Rank 1 is descheduled for 3 s between seeing every rank's post of call 1 and copying the rows, while rank 0
    (timeout 0.5 s) gives calls 2-4 up; then call 5 with a long timeout."""
    comm = Comm(dist.group.WORLD, timeout_s=0.5)
    board = HostBoard.open(comm)
    assert board is not None
    if rank == 1:
        wait = board._wait

        def stalled(seq_words: list[int], call: int, op: str) -> None:
            wait(seq_words, call, op)
            if call == 1:
                time.sleep(3.0)

        board._wait = stalled
    outcomes = []
    for call in range(1, 6):
        comm.timeout_s = 30.0 if call == 5 else 0.5
        try:
            outcomes.append(str(board.all_gather_ints([100 * call + rank], f"call {call}")))
        except CommTimeoutError:
            outcomes.append("timed out")
    board.close()
    return outcomes


def test_a_stalled_reader_never_reads_a_later_call() -> None:
    # Before the fix rank 0, having given call 2 up, wrote call 3 into the slot rank 1 was about to read call 1
    # from: rank 1 returned [[300], [101]] as call 1's rows, silently.
    expected = ["[[100], [101]]", "timed out", "timed out", "timed out", "[[500], [501]]"]
    assert run_ranks(2, _stalled_reader, timeout=90) == [expected, expected]


def _arrivals_at_the_deadline(rank: int, world: int) -> list[str]:
    """Rank 1 posts around rank 0's deadline, many times; rank 0 is descheduled for 1 ms right after it looks at
    the slots (its clock read sleeps, as a preempted process would), which widens the window in which a peer can
    post between that look and the giving up."""
    import types

    from deep_ep import host_board

    comm = Comm(dist.group.WORLD)
    board = HostBoard.open(comm)
    assert board is not None
    if rank == 0:
        clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
        clock.monotonic = lambda: (time.sleep(0.001), time.monotonic())[1]
        host_board.time = clock
    outcomes = []
    for trial in range(40):
        comm.timeout_s = 60.0
        board.all_gather_ints([trial], "in step")
        comm.timeout_s = 0.05
        if rank == 1:
            time.sleep(0.0512 + (trial % 20) * 100e-6)
        try:
            board.all_gather_ints([rank], "the call")
            outcomes.append("ok")
        except CommTimeoutError:
            outcomes.append("timed out")
    board.close()
    return outcomes


@pytest.mark.skipif(not board_supported(), reason="the host board needs x86-64 (or DEEP_EP_HOST_BOARD=0 is set)")
def test_a_call_that_times_out_fails_or_succeeds_on_every_rank_alike() -> None:
    first, second = run_ranks(2, _arrivals_at_the_deadline, timeout=120)
    assert first == second, [(i, a, b) for i, (a, b) in enumerate(zip(first, second)) if a != b]


def _open_while_a_peer_is_gone(rank: int, world: int) -> tuple[str, bool]:
    import tempfile

    if rank == 1:
        gather = Comm.all_gather
        calls = []

        def exit_on_the_second(*args, **kwargs):  # dies once rank 0 has made the board file
            calls.append(1)
            return gather(*args, **kwargs) if len(calls) == 1 else os._exit(0)

        Comm.all_gather = exit_on_the_second
        Buffer(dist.group.WORLD)
    created = []
    make = tempfile.mkstemp

    def recorded(*args, **kwargs):  # only observes which board file rank 0 makes
        fd, path = make(*args, **kwargs)
        created.append(path)
        return fd, path

    tempfile.mkstemp = recorded
    with pytest.raises(CommTimeoutError) as info:
        Buffer(dist.group.WORLD)
    tempfile.mkstemp = make
    return str(info.value), bool(created) and not any(os.path.exists(path) for path in created)


@pytest.mark.skipif(not board_supported(), reason="the host board needs x86-64 (or DEEP_EP_HOST_BOARD=0 is set)")
def test_a_board_that_fails_to_open_leaves_no_file_behind() -> None:
    message, removed = run_ranks(2, _open_while_a_peer_is_gone, doomed=(1,), timeout=60)[0]
    assert "open the host board" in message and removed


def _killed_while_waiting_for_peers(rank: int, world: int, record: str) -> None:
    import signal
    import tempfile

    if rank == 1:
        return None  # still on its way (as far as rank 0 can tell) when rank 0 is killed
    make = tempfile.mkstemp

    def recorded(*args, **kwargs):  # only observes which board file rank 0 makes
        fd, path = make(*args, **kwargs)
        with open(record, "w") as out:
            out.write(path)
        return fd, path

    tempfile.mkstemp = recorded
    # The job is killed (SIGKILL: no finally runs) while rank 0 waits in its first collective for the others.
    Comm.all_gather = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    Buffer(dist.group.WORLD)


@pytest.mark.skipif(not board_supported(), reason="the host board needs x86-64 (or DEEP_EP_HOST_BOARD=0 is set)")
def test_a_rank_killed_while_peers_are_still_coming_leaves_no_board_file(tmp_path) -> None:
    record = tmp_path / "board_path"
    run_ranks(2, _killed_while_waiting_for_peers, str(record), doomed=(0,), timeout=60)
    left = record.read_text() if record.exists() else ""
    if left and os.path.exists(left):
        os.unlink(left)  # the old code's leak: tidied, then failed
        pytest.fail(f"{left} was left behind")


def _buffer_on_a_full_dev_shm(rank: int, world: int) -> bool:
    buffer = Buffer(dist.group.WORLD)
    buffer._agree("combine", hidden=1, x_dtype=0, num_topk=0, num_worst_tokens=0, handle_serial=0, on_buffer_device=1)
    return buffer._comm.board is not None


def board_on_a_full_dev_shm() -> list[bool]:
    """Run by the test below, inside a mount namespace whose /dev/shm is full."""
    return run_ranks(2, _buffer_on_a_full_dev_shm, timeout=60)


@pytest.mark.skipif(not board_supported() or shutil.which("unshare") is None, reason="needs x86-64 and unshare")
def test_a_full_dev_shm_means_no_board_not_a_crash() -> None:
    # Before the fix the board file was sparse: rank 0 died of SIGBUS at its first write to the board.
    here = os.path.dirname(os.path.abspath(__file__))
    script = (
        "mount -t tmpfs -o size=1m tmpfs /dev/shm || exit 77; head -c 1048576 /dev/zero > /dev/shm/filler; "
        "exec \"$0\" -c 'import test_host_board; print(test_host_board.board_on_a_full_dev_shm())'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}
    done = subprocess.run(
        # a user namespace lets an unprivileged user mount a tmpfs of its own over /dev/shm
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, sys.executable],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    if done.returncode == 77 or done.stderr.startswith("unshare:"):
        pytest.skip(f"no mount namespace of our own here: {done.stderr.strip()}")
    assert done.returncode == 0 and done.stdout.strip().endswith("[False, False]"), done.stdout + done.stderr


def _destroy_after_a_group_timeout(rank: int, world: int) -> tuple[bool, float]:
    buffer = Buffer(dist.group.WORLD, explicitly_destroy=True)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    idx = torch.tensor([[0], [1], [2], [3]])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    buffer.comm_timeout = 1.0 if rank == 0 else 20.0
    if rank == 1:  # slow inside the transfer, after the agreement: rank 0's wait on the group times out
        issue = buffer._comm.all_to_all
        buffer._comm.all_to_all = lambda *a, **k: (time.sleep(2.5), issue(*a, **k))[1]
    with contextlib.suppress(CommTimeoutError):
        buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    start = time.monotonic()
    with contextlib.suppress(CommTimeoutError):  # the peers' agreement on destroy may time out: it still frees
        buffer.destroy()
    took = time.monotonic() - start
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.get_dispatch_layout(idx, 4)
    if rank == 0:
        time.sleep(3.0)  # alive, as a job that goes on without this Buffer
    return True, took


@pytest.mark.skipif(not board_supported(), reason="the host board needs x86-64 (or DEEP_EP_HOST_BOARD=0 is set)")
def test_destroy_frees_every_rank_after_one_rank_timed_out_on_the_group() -> None:
    (_, _), (_, peer_took) = run_ranks(2, _destroy_after_a_group_timeout, timeout=120)
    assert peer_took < 10.0  # not the peer's 20 s comm_timeout


def _timeout_from_env(rank: int, world: int) -> float:
    return Buffer(dist.group.WORLD).comm_timeout


def test_comm_timeout_env_is_read_when_the_buffer_is_made() -> None:
    # The ranks' forkserver imported deep_ep before this environment reached them.
    assert run_ranks(2, _timeout_from_env, env={"DEEP_EP_COMM_TIMEOUT": "7"}) == [7.0, 7.0]


def _buffer_without_a_peer(rank: int, world: int) -> str | None:
    if rank == 1:
        time.sleep(120)  # alive, but never makes its Buffer
        return None
    with pytest.raises(CommTimeoutError) as info:
        Buffer(dist.group.WORLD)
    return str(info.value)


def test_buffer_waits_the_env_timeout_for_a_peer_that_never_comes() -> None:
    # Before the fix the board's opening waited the default 300 s whatever DEEP_EP_COMM_TIMEOUT said: the world's
    # 60 s deadline would kill rank 0 still waiting.
    message = run_ranks(2, _buffer_without_a_peer, doomed=(1,), timeout=60, env={"DEEP_EP_COMM_TIMEOUT": "2"})[0]
    assert "open the host board" in message and "within 2 s" in message, message


def _descriptors_after_dropped_buffers(rank: int, world: int) -> int:
    def open_descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    Buffer(dist.group.WORLD)  # whatever a first Buffer opens once (gloo's connections, imports) is open now
    gc.collect()
    gc.disable()  # released when dropped, not at some later cyclic collection
    try:
        before = open_descriptors()
        for _ in range(20):
            Buffer(dist.group.WORLD)  # dropped without destroy(): DeepEP's default, "freed on deletion"
        return open_descriptors() - before
    finally:
        gc.enable()


def test_a_dropped_buffer_closes_its_board_file() -> None:
    # Before the fix each dropped Buffer kept its board file open (20 more descriptors); others come and go.
    assert all(grown < 5 for grown in run_ranks(2, _descriptors_after_dropped_buffers))
