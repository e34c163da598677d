"""`EventOverlap` and `EventHandle`: completion tokens for asynchronous operations (SPEC section 7).

On a GPU an event is a device event recorded on the current stream. On the CPU there is no stream: an
asynchronous operation keeps its unfinished collectives and the step that unpacks their results, and
`current_stream_wait()` completes them, once (`run_once`, which the receive hooks share). Megatron imports both
event names from this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .comm import group_device_types


def run_once(step: Callable[[], None]) -> Callable[[], None]:
    """`step`, run at the first call only: a hook or event may be waited on twice, or a call with the handle may
    have received the dispatch first; stats must count each receive once. A step that raised raises again at
    every later call (its outputs were never filled), instead of returning as if it had received."""
    done = False
    failure: BaseException | None = None

    def run() -> None:
        nonlocal done, failure
        if failure is not None:
            raise RuntimeError(f"this receive failed earlier ({type(failure).__name__}: {failure})") from failure
        if not done:
            done = True
            try:
                step()
            except BaseException as error:
                failure = error
                raise

    return run


class EventHandle:
    """Marks a point of the current stream (a device event), or a pending CPU completion.

    `EventHandle()` records "now" on the current stream; on the CPU "now" is already complete.
    """

    def __init__(self, device: torch.device | None = None, finish: Callable[[], None] | None = None) -> None:
        self._finish = None if finish is None else run_once(finish)
        self._event = None
        device = device or _current_device()
        self._module = getattr(torch, device.type, None) if device.type != "cpu" else None
        if self._module is not None:  # torch.cuda, or torch.npu once torch_npu is imported
            self._event = self._module.Event()
            self._event.record(self._module.current_stream(device))

    def current_stream_wait(self) -> None:
        """Make the current stream (on the CPU: the caller) wait until the marked work is complete."""
        if self._finish is not None:
            self._finish()  # if it raised, every later wait raises again: the outputs were never filled
            self._finish = None
        if self._event is not None:
            self._module.current_stream().wait_event(self._event)

    @property
    def is_complete(self) -> bool:
        return self._finish is None and (self._event is None or self._event.query())


def _current_device() -> torch.device:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class EventOverlap:
    """DeepEP's event wrapper: `event.current_stream_wait()`, or `with event:` around overlapped work.

    Arguments:
        event: the `EventHandle` to wait on, or None (nothing to wait for).
        extra_tensors: tensors kept alive until the wait, as DeepEP does for its stream-ordered allocator.
    """

    def __init__(self, event: EventHandle | None = None, extra_tensors: tuple[torch.Tensor, ...] | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event; on the CPU, complete the pending operation."""
        if self.event is not None:
            self.event.current_stream_wait()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        # DeepEP waits on exit: work inside the `with` block overlaps the communication.
        if self.event is not None:
            self.event.current_stream_wait()


def check_nvlink_connections(group: dist.ProcessGroup) -> None:
    """DeepEP's check that the group's GPUs reach each other directly: raises RuntimeError if this rank's GPU
    cannot access a GPU it sees peer to peer. Nothing to check where the group does not run on CUDA GPUs."""
    if "cuda" not in group_device_types(group) or not torch.cuda.is_available():
        return
    index = torch.cuda.current_device()
    for other in range(torch.cuda.device_count()):
        if other != index and not torch.cuda.can_device_access_peer(index, other):
            raise RuntimeError(f"GPU {index} cannot access GPU {other} peer to peer (no NVLink or P2P path)")
