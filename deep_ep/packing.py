"""Rows of several tensors packed into one byte row, so one all-to-all moves them all bit-exactly.

Bytes are dtype-agnostic (gloo has no float8) and a row travels unchanged, which is what makes the
reference backend bit-exact by construction.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Field:
    """One tensor of a packed row: its dtype and the shape of one row (() for one scalar per row)."""

    name: str
    dtype: torch.dtype
    row_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.row_shape:
            count *= size
        return count * self.dtype.itemsize


class RowFormat:
    """Byte layout of a packed row: the fields side by side, in order."""

    def __init__(self, fields: list[Field]) -> None:
        self.fields = fields
        self.width = sum(field.nbytes for field in fields)

    @staticmethod
    def of(**tensors: torch.Tensor | None) -> RowFormat:
        """The format of the given row tensors ([N, ...] each); None entries are left out."""
        return RowFormat([Field(name, t.dtype, tuple(t.shape[1:])) for name, t in tensors.items() if t is not None])

    def pack(self, **tensors: torch.Tensor) -> torch.Tensor:
        """uint8 [N, width]: row t holds row t of every field (a view, no copy, for one dense field)."""
        parts = [byte_rows(tensors[field.name], field.nbytes) for field in self.fields]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=1)

    def field_view(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """Field `name` of uint8 rows [M, width] as [M, *row_shape]: a strided view where the bytes line up
        with the dtype, else a dense copy."""
        offset = self.offset(name)
        field = next(field for field in self.fields if field.name == name)
        if field.nbytes == 0:  # no bytes to view (a [M, 0] field may sit where its dtype cannot)
            return rows.new_empty((rows.shape[0], *field.row_shape), dtype=field.dtype)
        part = rows[:, offset : offset + field.nbytes]
        size = field.dtype.itemsize
        aligned = part.storage_offset() % size == 0 and part.stride(0) % size == 0
        if not aligned or (part.dim() and part.stride(-1) != 1):
            part = part.clone(memory_format=torch.contiguous_format)
        return part.view(field.dtype).view(rows.shape[0], *field.row_shape)

    def offset(self, name: str) -> int:
        """The byte offset of field `name` in a packed row (KeyError if there is none)."""
        offset = 0
        for field in self.fields:
            if field.name == name:
                return offset
            offset += field.nbytes
        raise KeyError(name)

    def unpack(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fields of uint8 rows [M, width], each a contiguous tensor [M, *row_shape]."""
        out, offset = {}, 0
        for field in self.fields:
            if field.nbytes == 0:  # no bytes to view
                out[field.name] = rows.new_empty((rows.shape[0], *field.row_shape), dtype=field.dtype)
            else:  # a fresh dense copy: a dtype view needs standard strides and an aligned start
                part = rows[:, offset : offset + field.nbytes].clone(memory_format=torch.contiguous_format)
                out[field.name] = part.view(field.dtype).reshape(rows.shape[0], *field.row_shape)
            offset += field.nbytes
        return out

    def unpack_into(self, rows: torch.Tensor, **targets: torch.Tensor) -> None:
        """Copy each field of uint8 rows [M, width] into its dense target [M, *row_shape]: one pass."""
        offset = 0
        for field in self.fields:
            target = targets.get(field.name)
            if target is not None:
                byte_rows(target, field.nbytes).copy_(rows[:, offset : offset + field.nbytes])
            offset += field.nbytes


def byte_rows(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """t [N, ...] as uint8 [N, nbytes] sharing its memory where the layout allows (else a dense copy).

    A byte view needs stride(-1) == 1, which a "contiguous" tensor with a size-1 dimension need not have
    (e.g. fp8 scales [N, 1] transposed from [1, N]). Writers (unpack_into) pass tensors they allocated dense.
    """
    if not t.is_contiguous() or (t.dim() > 0 and t.stride(-1) != 1):
        t = t.clone(memory_format=torch.contiguous_format)
    rows = t.view(torch.uint8)
    # A 2-D byte view already has the shape (one op fewer on every call's hot path).
    return rows if t.dim() == 2 else rows.reshape(t.shape[0], nbytes)


class HostBuffers:
    """A small caching allocator for the large host tensors of one backend (CPU only; elsewhere torch.empty).

    A tensor of `min_bytes` or more is placed on a storage that an earlier call used and that nothing references
    any more. Fresh host memory that large comes straight from the kernel (above glibc's mmap threshold), and
    every page of it faults on first touch: on a VM about 1 ms per MB, several times what writing it costs, so a
    dispatch that received into fresh memory was mostly page faults. GPU memory has the caching allocator.

    The tensors handed out are plain tensors (not views: autograd treats them like any other result) whose
    storage may be up to twice their size. A storage counts as free when its use count says only this cache
    holds it, so a tensor still in flight (held by a collective, a pending step, the caller) is never reused.
    """

    min_bytes = 1 << 17  # glibc's initial mmap threshold
    limit = 16  # storages remembered, least recently used first out
    idle_bytes = 1 << 30  # at most this much memory kept for reuse

    def __init__(self) -> None:
        self._storages: list[torch.UntypedStorage] = []  # least recently used first
        self._lock = threading.Lock()  # two threads must never be handed one storage

    def empty(self, size: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        device = torch.device(device)
        numel = 1
        for n in size:
            numel *= n
        nbytes = numel * dtype.itemsize
        if device.type != "cpu" or nbytes < self.min_bytes or _storage_use_count is None:
            return torch.empty(size, dtype=dtype, device=device)
        with self._lock:
            return self._take(size, dtype, device, nbytes)

    def _take(self, size: tuple[int, ...], dtype: torch.dtype, device: torch.device, nbytes: int) -> torch.Tensor:
        best = None
        for i, storage in enumerate(self._storages):
            capacity = storage.nbytes()
            if nbytes <= capacity <= 2 * nbytes and _storage_use_count(storage._cdata) == 1:
                if best is None or capacity < self._storages[best].nbytes():
                    best = i
        if best is None:  # room to grow a little, so that a slightly larger call next time fits
            storage = torch.UntypedStorage(nbytes + nbytes // 8, device=device)
            self._trim(self.limit - 1, self.idle_bytes - storage.nbytes())
        else:
            storage = self._storages.pop(best)
        self._storages.append(storage)
        return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, size)

    def _trim(self, count: int, idle_bytes: int) -> None:
        """Forget the least recently used storages until at most `count` remain and the idle ones hold at most
        `idle_bytes` (a storage still in use is only forgotten, its holders keep it)."""
        idle = [s for s in self._storages if _storage_use_count(s._cdata) == 1]
        held = sum(s.nbytes() for s in idle)
        while idle and (len(self._storages) > count or held > idle_bytes):
            oldest = idle.pop(0)
            held -= oldest.nbytes()
            self._storages.remove(oldest)
        del self._storages[: max(0, len(self._storages) - count)]


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
