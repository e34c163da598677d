"""Host time of the fresh dispatch's one small host-to-device copy (the prefix matrices: ~100 int32), three ways,
alternating, on one GPU: a fresh pinned tensor (main), reused pinned memory (`PinnedInts`, as tried in 788be75 and
reverted after this measurement; copied here), a pageable tensor. Each call's result is used by a tiny kernel, as
the route kernel uses it.

    python3 docs/results/2026-11-23-session25/pinned_bench.py
"""

from __future__ import annotations

import array
import ctypes
import time

import torch


class PinnedInts:
    """788be75's reused pinned buffer: rewritten once its previous copy's event has completed."""

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def to_device(self, values: list[int], device: torch.device) -> torch.Tensor:
        count = len(values)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.synchronize()
        if self._host is None or self._host.numel() < count:
            self._host = torch.empty(max(count, 256), dtype=torch.int32, pin_memory=True)
        words = array.array("i", values)
        ctypes.memmove(self._host.data_ptr(), words.buffer_info()[0], words.itemsize * count)
        flat = self._host[:count].to(device, non_blocking=True)
        self._copied.record()
        return flat


device = torch.device("cuda", 0)
values = list(range(102))
pinned = PinnedInts()
ways = {
    "fresh pinned tensor": lambda: torch.tensor(values, dtype=torch.int32, pin_memory=True).to(
        device, non_blocking=True
    ),
    "PinnedInts": lambda: pinned.to_device(values, device),
    "pageable tensor": lambda: torch.tensor(values, dtype=torch.int32).to(device),
}
results = {name: [] for name in ways}
for _ in range(7):
    for name, way in ways.items():
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(2000):
            flat = way()
            flat.add_(1)
        results[name].append((time.perf_counter() - start) / 2000 * 1e6)
        torch.cuda.synchronize()
for name, times in results.items():
    times = sorted(times[1:])
    print(f"{name}: median {times[len(times) // 2]:.1f} us per copy (+ one add), range {times[0]:.1f}-{times[-1]:.1f}")
