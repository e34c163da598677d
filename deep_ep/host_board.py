"""A board in host shared memory where the ranks of one machine swap small tensors without the device.

Every checked call swaps a row of arguments (agreement.py) and a fresh dispatch swaps its counts; the result
is needed on the host before the call may go on. Over NCCL or HCCL such an all-gather waits in the device's
queue and is then read back (about 0.4 ms per call on 4xH200); over gloo on a shared CPU it costs 0.5-2 ms.
Ranks that share a machine instead post their bytes to a shared mapped file: microseconds, and the device
queue keeps running.

Protocol: call k writes the payload to this rank's slot for parity k % 2 and then stores k in the slot's last word;
a reader waits until every rank's slot holds k and copies the payloads. Two parities suffice: a rank writes
call k + 2 only once every rank has posted (or given up) call k + 1, which each does only after reading call k (normally
known already from the wait of call k + 1; after a give-up, waited for). A rank whose wait for call k times out
stores -k there instead: a rank that reaches call k later (or is waiting for it) then raises too, so every rank
counts call k as failed and the next call pairs again; a sequence word beyond k, or -k, means its rank has given up
on call k. Posting k and giving up are made under one lock (`flock` on the board file), and a rank gives up only if,
under it, some rank has still not posted: otherwise a rank that posted just before could already have seen every
rank posted and gone on. The store order this relies on (payload before sequence word, as seen by other cores) is
what x86-64 guarantees for ordinary stores (payloads stay far below the size where memcpy turns to non-temporal
stores); elsewhere the board is not used and the exchange goes over the group.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import platform
import secrets
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from .errors import CollectiveMismatchError, CommTimeoutError

if TYPE_CHECKING:
    from .comm import Comm

try:
    import fcntl  # the board's lock; POSIX only, as the board itself
except ImportError:  # pragma: no cover - such systems exchange over the group
    fcntl = None

_PATH_WORDS = 64  # the file's path travels as int64 code points
CAPACITY_BYTES = 64 * 1024  # a payload per rank and call; larger exchanges go over the group
_SLOT_WORDS = 1 + CAPACITY_BYTES // 8 + 1  # [payload bytes][payload][sequence]
_SPIN_BEFORE_YIELD = 200
_YIELD_BEFORE_SLEEP_S = 0.002
_SLEEP_S = 50e-6
_LOOK_FOR_DEAD_S = 0.05  # how often a wait checks that the ranks it waits for still exist


def board_supported() -> bool:
    """Whether this CPU orders stores as the protocol needs (x86-64: total store order) and the system has the
    board's lock (POSIX flock), unless env turns it off."""
    return (
        fcntl is not None
        and platform.machine().lower() in ("x86_64", "amd64")
        and os.environ.get("DEEP_EP_HOST_BOARD", "1") != "0"
    )


class HostBoard:
    """Tensors of up to CAPACITY_BYTES swapped among the ranks of `comm`, all on this machine, through shared memory."""

    def __init__(self, comm: Comm, memory: mmap.mmap, fd: int, pids: list[int] | None) -> None:
        # The comm owns this board: a weak reference keeps the two out of a cycle, so both go (and the board file
        # is closed) as soon as their Buffer is dropped, not at the next cyclic garbage collection.
        self._comm = weakref.proxy(comm)
        self._memory, self._fd = memory, fd  # fd: the board file, for its lock
        # A Buffer dropped without destroy() (DeepEP's default: freed on deletion) must not keep the board file
        # open: the descriptor is closed when this board is collected, or by close(). (The mapping goes with the
        # mmap object, once the views of it are gone.)
        self._close_fd = weakref.finalize(self, os.close, fd)
        self._words = memoryview(memory).cast("q")  # Python indexing: the fast way to poll one word
        self._bytes = torch.frombuffer(memory, dtype=torch.uint8)
        self._calls = 0
        # A collective over the group notices a peer that died (its connection closes); a wait on the board
        # notices it by the peer's process, where this process can see every rank's (one PID namespace).
        self._pids = pids if pids is not None and all(not _process_gone(pid) for pid in pids) else None

    @classmethod
    def open(cls, comm: Comm) -> HostBoard | None:
        """A board for the group (collective), or None when some rank cannot map it (another machine or namespace)."""
        # Every rank takes part in every exchange even where the board cannot work, so all ranks decide alike.
        # Rank 0 makes the board file only once every rank has come: a job killed while ranks are still arriving
        # (a wait of up to comm_timeout) leaves no file behind in /dev/shm.
        me = torch.tensor([int(board_supported()), os.getpid(), *_pid_namespace()])
        present = comm.all_gather(me, "open the host board").tolist()
        if not all(row[0] for row in present):
            return None
        size_bytes = 8 * (1 + comm.size * 2 * _SLOT_WORDS)
        nonce = secrets.randbits(62) + 1
        path, memory, fd = "", None, -1
        try:
            if comm.rank == 0:
                directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
                fd, path = tempfile.mkstemp(prefix="deep_ep_board_", dir=directory)
                # Every page now: a full /dev/shm (64 MiB in a Docker container, DataLoader workers') then means
                # no board rather than SIGBUS at the first write to a page that cannot be had.
                with contextlib.suppress(OSError):
                    os.posix_fallocate(fd, 0, size_bytes)
                    memory = mmap.mmap(fd, size_bytes)
                    memory[:8] = nonce.to_bytes(8, "little", signed=True)
            offer = torch.zeros(_PATH_WORDS + 1, dtype=torch.int64)
            if memory is not None:
                encoded = path.encode()
                if len(encoded) <= _PATH_WORDS:
                    offer[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.int64)
                    offer[_PATH_WORDS] = nonce
            gathered = comm.all_gather(offer, "open the host board")[0].tolist()
            expected_nonce = gathered[_PATH_WORDS]
            if comm.rank != 0 and expected_nonce:
                memory, fd = _map_existing(bytes(c for c in gathered[:_PATH_WORDS] if c).decode(), size_bytes)
            mapped = memory is not None and int.from_bytes(memory[:8], "little", signed=True) == expected_nonce
            everyone = comm.all_gather(torch.tensor(int(mapped)), "open the host board").tolist()
        except BaseException:
            _release(memory, fd)
            raise
        finally:
            if path:
                os.unlink(path)  # the mappings and descriptors outlive the name; nothing is left behind
        if not all(everyone):
            _release(memory, fd)
            return None
        # A process ID names the same process only within one PID namespace (ranks in containers may share
        # /dev/shm but not their PIDs): elsewhere a wait cannot look for dead ranks by their PIDs.
        namespace = present[0][2:]
        one_namespace = namespace != [0, 0] and all(row[2:] == namespace for row in present)
        return cls(comm, memory, fd, [row[1] for row in present] if one_namespace else None)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The board's lock, held across processes (`flock` on the board file), for posting and giving up."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _slot(self, rank: int, parity: int) -> int:
        """The word where (rank, parity)'s slot begins."""
        return 1 + (rank * 2 + parity) * _SLOT_WORDS

    def all_gather(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """Every rank's host `tensor` stacked, [R, *shape]; raises CommTimeoutError if a rank never posts."""
        payload = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        nbytes = payload.numel()
        starts = self._exchange(nbytes, lambda word: self._bytes[8 * word : 8 * word + nbytes].copy_(payload), op)
        rows = self._bytes.as_strided((len(starts), nbytes), (2 * 8 * _SLOT_WORDS, 1), 8 * starts[0]).clone()
        return rows.view(tensor.dtype).view(len(starts), *tensor.shape)

    def all_gather_ints(self, row: list[int], op: str) -> list[list[int]]:
        """Every rank's `row` of Python ints (int64), in rank order: `all_gather` without a torch op, for the
        agreement row that every checked call swaps."""
        words, width = self._words, len(row)

        def write(word: int) -> None:
            words[word : word + width] = array.array("q", row)

        return [words[start : start + width].tolist() for start in self._exchange(8 * width, write, op)]

    def _exchange(self, nbytes: int, write: Callable[[int], object], op: str) -> list[int]:
        """One call of the protocol: `write(word)` puts this rank's payload at that word of its slot, the call
        is published, every rank's awaited; returns where each rank's payload begins (words), in rank order."""
        assert nbytes <= CAPACITY_BYTES, f"{op}: {nbytes} bytes exceed the board's {CAPACITY_BYTES}"
        self._calls += 1
        call, parity, words = self._calls, self._calls % 2, self._words
        mine = self._slot(self._comm.rank, parity)
        self._await_readers(call, mine, op)
        words[mine] = nbytes
        write(mine + 1)
        with self._locked():  # not between another rank's look at the slots and its giving up
            words[mine + _SLOT_WORDS - 1] = call  # published after the payload (x86-64 keeps the stores in order)
        slots = [self._slot(rank, parity) for rank in range(self._comm.size)]
        self._wait([slot + _SLOT_WORDS - 1 for slot in slots], call, op)
        sizes = [words[slot] for slot in slots]
        if any(n != nbytes for n in sizes):
            raise CollectiveMismatchError(f"{op}: ranks exchanged payloads of different sizes ({sizes} bytes)")
        return [slot + 1 for slot in slots]

    def _await_readers(self, call: int, mine: int, op: str) -> None:
        """Wait until no rank can still be reading call - 2 from this rank's slot `mine`: every rank has posted or
        given up call - 1, which it does only after reading call - 2. That holds at once unless this rank gave up
        call - 1 (it then began this call without waiting for every post), so this costs one look per call. A rank
        that never comes fails this call on every rank, as a timeout in `_wait` does."""
        previous = [self._slot(rank, 1 - call % 2) + _SLOT_WORDS - 1 for rank in range(self._comm.size)]
        started = time.monotonic()
        while late := [rank for rank, i in enumerate(previous) if abs(self._words[i]) < call - 1]:
            waited = time.monotonic() - started
            gone = self._pids is not None and any(self._exited_unposted(r, previous[r], call - 1) for r in late)
            if gone or waited > self._comm.timeout_s:
                with self._locked():
                    self._words[mine + _SLOT_WORDS - 1] = -call  # a rank that reaches this call fails it too
                raise CommTimeoutError(
                    f"{op}: ranks {late} did not finish the call before (their process exited, or comm_timeout "
                    f"{self._comm.timeout_s:g} s), seen on rank {self._comm.rank} of {self._comm.size}"
                )
            time.sleep(_SLEEP_S)

    def _wait(self, seq_words: list[int], call: int, op: str) -> None:
        words, spins, started, next_look = self._words, 0, None, 0.0
        while any(words[i] != call for i in seq_words):
            self._raise_if_given_up(seq_words, call, op)
            spins += 1
            if spins < _SPIN_BEFORE_YIELD:
                continue
            now = time.monotonic()
            started = started or now
            waited = now - started
            where = f"seen on rank {self._comm.rank} of {self._comm.size}"
            if waited > self._comm.timeout_s:
                late = self._give_up(seq_words, call, range(self._comm.size))
                if not late:  # everyone posted after all: some may have seen it and gone on, so go on too
                    return
                self._raise_if_given_up(seq_words, call, op)  # a peer that gave up meanwhile is not late
                raise CommTimeoutError(
                    f"{op}: ranks {late} did not reach the call within {self._comm.timeout_s:g} s, {where}"
                )
            if self._pids is not None and waited >= next_look:
                next_look = waited + _LOOK_FOR_DEAD_S
                # Ranks that exited without posting or giving up this call (one that did either, then exited, is
                # not gone: it reached the call). The call is then given up as on a timeout.
                late = [rank for rank, i in enumerate(seq_words) if abs(words[i]) < call]
                gone = [rank for rank in late if self._exited_unposted(rank, seq_words[rank], call)]
                if gone:
                    gone = self._give_up(seq_words, call, gone)
                if gone:
                    raise CommTimeoutError(f"{op}: ranks {gone} went away (their processes exited), {where}")
            # Yield the core first (ranks may outnumber cores), then sleep so a long wait costs no CPU.
            if waited < _YIELD_BEFORE_SLEEP_S:
                os.sched_yield()
            else:
                time.sleep(_SLEEP_S)

    def _raise_if_given_up(self, seq_words: list[int], call: int, op: str) -> None:
        """Raise if a peer gave `call` up (or went on past it): every rank fails a call that one gave up."""
        words, me = self._words, self._comm.rank
        given_up = [r for r, i in enumerate(seq_words) if r != me and (words[i] == -call or abs(words[i]) > call)]
        if given_up:
            late = [r for r, i in enumerate(seq_words) if r != me and words[i] != call and r not in given_up]
            raise CommTimeoutError(
                f"{op}: ranks {late or [self._comm.rank]} did not reach the call before ranks {given_up} gave "
                f"up waiting (comm_timeout, or a rank's process exited), seen on rank {self._comm.rank} of "
                f"{self._comm.size}; every rank fails this call"
            )

    def _exited_unposted(self, rank: int, seq_word: int, call: int) -> bool:
        """Whether `rank` exited without posting or giving up `call`. Its word is read after its exit is seen: a
        rank that posted or gave up, then exited before this look, is not taken for gone (its word is final)."""
        return _process_gone(self._pids[rank]) and abs(self._words[seq_word]) < call

    def _give_up(self, seq_words: list[int], call: int, ranks: Iterable[int]) -> list[int]:
        """Those of `ranks` that have not posted `call`, checked under the board's lock; if there are any, `call` is
        marked given up on this rank's slot, so that a rank that posts it later raises too."""
        with self._locked():
            late = [rank for rank in ranks if self._words[seq_words[rank]] != call]
            if late:
                self._words[seq_words[self._comm.rank]] = -call
        return late

    def close(self) -> None:
        del self._bytes
        self._words.release()
        self._memory.close()
        self._close_fd()


def _release(memory: mmap.mmap | None, fd: int) -> None:
    if memory is not None:
        memory.close()
    if fd >= 0:
        os.close(fd)


def _pid_namespace() -> tuple[int, int]:
    """This process's PID namespace, as (device, inode) of /proc/self/ns/pid; (0, 0) where it cannot be seen."""
    try:
        info = os.stat("/proc/self/ns/pid")
    except OSError:
        return 0, 0
    return info.st_dev, info.st_ino


def _process_gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie counts as exited; Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _map_existing(path: str, size_bytes: int) -> tuple[mmap.mmap | None, int]:
    """The board file at `path` mapped, and its descriptor (kept for the lock); (None, -1) if it cannot be."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None, -1
    try:
        if os.fstat(fd).st_size == size_bytes:
            return mmap.mmap(fd, size_bytes), fd
    except OSError:
        pass
    os.close(fd)
    return None, -1
