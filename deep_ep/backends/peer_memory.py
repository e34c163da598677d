"""Peer memory for the cuda backend: one byte buffer per rank, mapped into every peer (torch symmetric memory).

NVLink multicast stays off: `SymmetricWorkspace.ensure` sets `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` (unless already
set) before it allocates, and refuses a mapping that has a multicast object anyway. Nothing here imports
symmetric memory at module level, so `import deep_ep` keeps working on a CPU-only install.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("deep_ep.cuda")

MIN_WORKSPACE_BYTES = 32 << 20  # regrowth costs a device sync and a collective rendezvous: start generous
WORD = 4  # bytes: the kernels address workspaces in int32 words
_MULTICAST_ENV = "TORCH_SYMM_MEM_DISABLE_MULTICAST"


def workspace_size(nbytes: int, minimum: int = MIN_WORKSPACE_BYTES) -> int:
    """Bytes to allocate for a need of `nbytes`: the next power of two, at least `minimum`, so that a slowly
    growing need regrows rarely (each regrowth is a device sync plus a collective rendezvous)."""
    return max(minimum, 1 << max(nbytes - 1, 0).bit_length())


def word_deltas(workspace: Any, device: torch.device) -> torch.Tensor:
    """int64 [R]: how far each rank's workspace mapping lies from this rank's, in words, which is how the
    kernels address a peer (`ws + delta[peer]`). Every distance must keep 16-byte alignment: the kernels
    promise the compiler 16-byte aligned rows."""
    base = workspace.local.data_ptr()
    deltas = []
    for peer in range(workspace.size):
        distance = workspace.peer(peer).data_ptr() - base
        if distance % 16:
            raise RuntimeError(f"peer {peer}'s workspace is not 16-byte aligned relative to ours")
        deltas.append(distance // WORD)
    return torch.tensor(deltas, dtype=torch.int64, device=device)


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


class SymmetricWorkspace:
    """One byte buffer per rank, equal in size on every rank, each mapped into every peer (torch symmetric
    memory). Growing it is collective: every rank must call `ensure` with the same size in the same call.

    The backend uses only `ensure`, `peer`, `local`, `nbytes`, `size` and `barrier`; the CPU tests substitute a
    stand-in with the same members (shared files and a gloo barrier) to run the backend's logic end to end.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.nbytes = 0
        self.local: torch.Tensor | None = None
        self._handle: Any = None
        self._peers: list[torch.Tensor] = []

    def ensure(self, nbytes: int) -> None:
        """Grow to at least `nbytes` (a power of two, at least MIN_WORKSPACE_BYTES); collective when it grows."""
        if nbytes <= self.nbytes:
            return
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"the cuda backend needs a {nbytes}-byte workspace but has {self.nbytes} bytes, and it cannot grow "
                "during CUDA-graph capture; run the same call once before capturing"
            )
        size = workspace_size(nbytes)
        # Multicast must stay off; the variable is read when memory is allocated and rendezvoused.
        os.environ.setdefault(_MULTICAST_ENV, "1")
        import torch.distributed._symmetric_memory as symm_mem

        # Our queued kernels may still read the old buffer, and the barrier that ends the peers' writes into
        # it may still be queued: let all of that finish before the old buffer is released.
        torch.cuda.synchronize(self.device)
        self._peers, self._handle, self.local, self.nbytes = [], None, None, 0
        local = symm_mem.empty(size, dtype=torch.uint8, device=self.device)
        handle = _rendezvous(symm_mem, local, self.group)
        if handle.rank != self.rank or handle.world_size != self.size:
            raise RuntimeError(
                f"symmetric memory rendezvous gave rank {handle.rank} of {handle.world_size}, expected group rank "
                f"{self.rank} of {self.size}"
            )
        if _multicast_in_use(handle):
            raise RuntimeError(
                "torch symmetric memory set up NVLink multicast, which the cuda backend must not use (its barrier "
                f"would then use multimem instructions); set {_MULTICAST_ENV}=1 in every rank's environment "
                "before the first symmetric-memory allocation"
            )
        self._peers = [
            local if peer == self.rank else handle.get_buffer(peer, (size,), torch.uint8, 0)
            for peer in range(self.size)
        ]
        self.local, self._handle, self.nbytes = local, handle, size
        log.info("deep_ep cuda: workspace of %d bytes per rank (rank %d of %d)", size, self.rank, self.size)

    def peer(self, rank: int) -> torch.Tensor:
        """uint8 [nbytes] aliasing `rank`'s buffer (this rank's own buffer for itself)."""
        return self._peers[rank]

    def barrier(self, timeout_s: float) -> None:
        """Device-side barrier of all ranks on the current stream (symmetric memory signal pads).

        Each rank's barrier kernel starts after the work queued before it on this stream has finished, and
        publishes that with a system-scope release; it returns once every peer's release has been acquired.
        A peer that never arrives traps the kernel after `timeout_s` (a CUDA error) instead of hanging.
        """
        timeout_ms = max(int(timeout_s * 1000), 1)
        try:
            self._handle.barrier(channel=0, timeout_ms=timeout_ms)
        except TypeError:  # a torch whose binding takes no timeout
            self._handle.barrier(channel=0)


def _multicast_in_use(handle: Any) -> bool:
    """Whether rendezvous mapped a multicast object (only read here, to refuse it: its barrier would use it)."""
    try:
        return bool(handle.multicast_ptr)
    except Exception:  # a symmetric-memory backend without the attribute has no multicast either
        return False


def _rendezvous(symm_mem: Any, tensor: torch.Tensor, group: dist.ProcessGroup) -> Any:
    name = group.group_name
    # Before torch 2.11 a group had to be enabled for symmetric memory first; 2.11 deprecated that (it
    # resolves the group's store itself), so newer versions are left alone.
    if _torch_version() < (2, 11):
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            enable(name)
    return symm_mem.rendezvous(tensor, name)
