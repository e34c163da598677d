"""EMULATION of torch symmetric memory on the CPU, for testing the cuda backend's logic without GPUs.

`HostSharedWorkspace` stands in for `deep_ep.backends.peer_memory.SymmetricWorkspace` (the vendor API it wraps:
`torch.distributed._symmetric_memory`): rank r's buffer is a shared file that every rank maps, and the
device barrier is gloo's `dist.barrier`. CPU ops finish before the barrier, as GPU stream order makes them.
`SimCudaBackend` is the real `CudaBackend` (push plans, unpacking, the Triton kernels run by Triton's CPU
interpreter with `TRITON_INTERPRET=1`) with only the workspace replaced; it registers as "cuda_sim" for CPU
tensors. Results that depend on it are labelled as emulated in the tests that use it.
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.distributed as dist

from ..backends import register_backend
from ..backends.cuda import CudaBackend
from ..backends.peer_memory import workspace_size

DIRECTORY_ENV = "DEEP_EP_SIM_DIR"  # where the shared files live (one directory per run)


class HostSharedWorkspace:
    """Same members as `SymmetricWorkspace` (`ensure`, `peer`, `local`, `nbytes`, `size`, `barrier`)."""

    _created = itertools.count()  # workspaces made in this process: every rank makes its Buffers in one order

    def __init__(self, group: dist.ProcessGroup, directory: str, minimum: int, purpose: str) -> None:
        self.group, self.directory, self.minimum = group, directory, minimum
        self.purpose = f"{purpose}-{next(self._created)}"  # files of their own, not another Buffer's
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.nbytes, self.generation = 0, 0
        self.local: torch.Tensor | None = None
        self._peers: list[torch.Tensor] = []

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        size = workspace_size(nbytes, self.minimum)
        self.generation += 1
        paths = [os.path.join(self.directory, f"{self.purpose}-gen{self.generation}-rank{r}") for r in range(self.size)]
        with open(paths[self.rank], "wb") as f:
            f.truncate(size)
        dist.barrier(self.group)  # every file exists before anyone maps it
        self._peers = [torch.from_file(p, shared=True, size=size, dtype=torch.uint8) for p in paths]
        self.local, self.nbytes = self._peers[self.rank], size

    def peer(self, rank: int) -> torch.Tensor:
        return self._peers[rank]

    def barrier(self, timeout_s: float) -> None:
        dist.barrier(self.group)


class SimCudaBackend(CudaBackend):
    """The cuda backend with its workspaces on the CPU stand-in (a tiny minimum, so they regrow often)."""

    name = "cuda_sim"
    device_types = ("cpu",)

    @classmethod
    def unavailable_reason(cls, group: dist.ProcessGroup, device: torch.device) -> str | None:
        return None

    def _new_workspace(self, purpose: str = "normal") -> HostSharedWorkspace:
        return HostSharedWorkspace(self.comm.group, os.environ[DIRECTORY_ENV], minimum=256, purpose=purpose)


def register() -> None:
    """Register "cuda_sim" in this process (a harness `setup`); needs DEEP_EP_SIM_DIR and TRITON_INTERPRET=1."""
    register_backend("cuda_sim", SimCudaBackend)
