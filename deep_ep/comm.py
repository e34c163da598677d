"""Collectives over one process group: device staging, timeouts, and deferred completion.

Everything the reference algorithm sends goes through `Comm`, so three concerns live in one place:
- which device a tensor must be on for the group's backend (gloo wants CPU tensors, NCCL CUDA, HCCL NPU;
  vLLM hands a gloo group CUDA tensors, which we stage through host memory);
- a timeout per wait, turned into `CommTimeoutError` naming the operation (a dead peer must not hang us);
- `Pending`: an issued collective plus the steps that finish the operation, run by `wait()`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import checks
from .errors import CommTimeoutError
from .host_board import CAPACITY_BYTES, HostBoard

# torch >= 2.13 renamed all_gather_into_tensor; the GPU hosts run 2.11.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_BACKEND_DEVICE = {"gloo": "cpu", "mpi": "cpu", "nccl": "cuda", "hccl": "npu", "xccl": "xpu"}


DEFAULT_TIMEOUT_S = 300.0


def default_timeout_s() -> float:
    """`DEEP_EP_COMM_TIMEOUT` (seconds, default 300), read when a Buffer is made, as the other DEEP_EP_* switches."""
    raw = os.environ.get("DEEP_EP_COMM_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"DEEP_EP_COMM_TIMEOUT={raw!r} must be a number of seconds") from None
    return checks.seconds("DEEP_EP_COMM_TIMEOUT", value)


def group_device_types(group: dist.ProcessGroup) -> set[str]:
    """Device types whose tensors the group's backend(s) can move, e.g. {"cpu"} for gloo."""
    config = str(dist.get_backend_config(group)) if hasattr(dist, "get_backend_config") else dist.get_backend(group)
    types = set()
    for part in config.split(","):
        device, _, name = part.rpartition(":")
        name = name.strip()
        # gloo reports "cuda:gloo" too, but its CUDA paths are partial: deep_ep stages CUDA tensors through
        # host memory on gloo groups instead (the vLLM case).
        types.add(_BACKEND_DEVICE[name] if name in ("gloo", "mpi") or not device else device)
    return types


def host_sync_allowed(device: torch.device) -> bool:
    """False while a CUDA graph is being captured: checks that read device values must then be skipped."""
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


class Pending:
    """Issued collectives and the steps that complete the operation once they have arrived."""

    def __init__(self, comm: Comm, op: str, works: list, finish: list[Callable[[], None]], on_host: bool) -> None:
        self._comm, self._op, self._works, self._finish, self._on_host = comm, op, works, finish, on_host
        # The steps write the call's outputs, made in the call's inference mode: a wait outside it (an async
        # call's event, a hook) must write them in that mode, or torch refuses the in-place update.
        self._inference = torch.is_inference_mode_enabled()

    def wait(self) -> None:
        works, self._works = self._works, []
        for work in works:
            self._comm.wait(work, self._op, self._on_host)
        finish, self._finish = self._finish, []
        same_mode = torch.is_inference_mode_enabled() == self._inference
        with contextlib.nullcontext() if same_mode else torch.inference_mode(self._inference):
            for step in finish:
                step()

    def then(self, step: Callable[[], None]) -> Pending:
        self._finish.append(step)
        return self


# Groups on which a wait timed out, with why (held weakly: a group dropped by the job is forgotten).
_OUT_OF_STEP: weakref.WeakKeyDictionary[dist.ProcessGroup, str] = weakref.WeakKeyDictionary()


class Comm:
    """One group's collectives as deep_ep uses them."""

    def __init__(self, group: dist.ProcessGroup, timeout_s: float | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device_types = group_device_types(group)
        self.timeout_s = default_timeout_s() if timeout_s is None else timeout_s
        self.board: HostBoard | None = None

    @property
    def out_of_step(self) -> str | None:
        """Why a wait on this group timed out, if one did: the group's collectives may then pair differently on
        each rank (a late rank's transfer with another call's), so every Buffer on the group refuses its calls,
        those made later included (gloo aborts the process on a mispaired transfer)."""
        return _OUT_OF_STEP.get(self.group)

    def open_host_board(self) -> None:
        """Collective: small all-gathers go through host shared memory from now on if every rank is on this host."""
        self.board = HostBoard.open(self)

    def close_host_board(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None

    def wire_device(self, device: torch.device) -> torch.device:
        """Where a tensor living on `device` travels: itself if the backend takes it, else the host."""
        if device.type in self.device_types:
            return device
        if "cpu" in self.device_types:
            return torch.device("cpu")
        if device.type == "cpu" and self.device_types:
            # Small host tensors (the agreement rows) over a device-only group (NCCL, HCCL) travel on the
            # group's device; torch.device("cuda") without an index means the current one.
            return torch.device(sorted(self.device_types)[0])
        raise ValueError(
            f"tensors on {device} cannot travel over a group whose backend serves {sorted(self.device_types)}"
        )

    def wait(self, work, op: str, on_host: bool = True) -> None:
        """Wait for `work`; on host (gloo) with the timeout, on a device stream-ordered (NCCL's own watchdog)."""
        try:
            if not on_host:
                work.wait()
                return
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as error:
            text = str(error).lower()
            if "timed out" in text or "timeout" in text:
                why = f"a peer did not answer within {self.timeout_s:g} s"
            elif "connection closed" in text or "connection reset" in text or "broken pipe" in text:
                why = "a peer went away (its connection closed)"
            else:
                raise
            _OUT_OF_STEP[self.group] = f"{op}: {why}"
            raise CommTimeoutError(
                f"{op}: {why}, seen on rank {self.rank} of {self.size} ({error}); the group's collectives may no "
                "longer pair up on every rank: make a new process group (and Buffer) to go on"
            ) from error

    def all_gather(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """Every rank's `tensor` stacked: [R, *tensor.shape], on `tensor`'s device (blocking)."""
        return self._gather(tensor, op, to_host=False)

    def all_gather_host(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """`all_gather`, read on the host (through the board where there is one: no device copy at all)."""
        return self._gather(tensor, op, to_host=True)

    def all_gather_ints(self, row: list[int], op: str) -> list[list[int]]:
        """Every rank's row of ints (int64), in rank order (blocking; the board's fast path where there is one)."""
        if self.board is not None:
            return self.board.all_gather_ints(row, op)
        return self.all_gather(torch.tensor(row, dtype=torch.int64), op).tolist()

    def _gather(self, tensor: torch.Tensor, op: str, to_host: bool) -> torch.Tensor:
        # The board needs the rows on the host: taken when they are there already or the caller reads them there
        # anyway, never to add a host synchronisation to a device-only exchange.
        if (
            self.board is not None
            and (tensor.device.type == "cpu" or to_host)
            and tensor.numel() * tensor.element_size() <= CAPACITY_BYTES
            and host_sync_allowed(tensor.device)
        ):
            host = self.board.all_gather(tensor.cpu(), op)
            return host if to_host else host.to(tensor.device)
        wire = tensor.to(self.wire_device(tensor.device)).contiguous()
        out = torch.empty((self.size * wire.numel(),), dtype=wire.dtype, device=wire.device)
        if wire.device.type == "cpu" and self.size > 1:
            # gloo's all-gather is a ring of R-1 dependent steps (64 ints: 4.5 ms at 4 ranks on 2 cores); an
            # all-to-all of R copies is one step (0.7 ms) and gathers the same rows.
            copies = wire.reshape(1, -1).expand(self.size, -1).contiguous().reshape(-1)
            work = dist.all_to_all_single(out, copies, group=self.group, async_op=True)
        else:
            work = _all_gather_single(out, wire.reshape(-1), group=self.group, async_op=True)
        self.wait(work, op, on_host=wire.device.type == "cpu")
        out = out.view(self.size, *tensor.shape)
        return out.cpu() if to_host else out.to(tensor.device)

    def all_to_all(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        op: str,
        out_splits: list[int] | None = None,
        in_splits: list[int] | None = None,
    ) -> Pending:
        """Start `all_to_all_single` of rows (equal splits when none are given); `out` is filled on wait()."""
        wire = self.wire_device(inp.device)
        if wire == inp.device:
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
            return Pending(self, op, [work], [], on_host=wire.type == "cpu")
        staged_out = torch.empty(out.shape, dtype=out.dtype, device=wire)
        work = dist.all_to_all_single(staged_out, inp.to(wire), out_splits, in_splits, group=self.group, async_op=True)
        return Pending(self, op, [work], [lambda: out.copy_(staged_out)], on_host=True)
