"""Performance-tuning `Config`, DeepEP's recommended configs per group size, and buffer size hints.

Everything here is plain integer arithmetic (SPEC sections 1 and 2), so a backend without NVLink/RDMA
buffers can still answer the size queries user code makes before building a `Buffer`.
"""

from __future__ import annotations

import functools
import operator

import torch

__all__ = [
    "Config",
    "combine_config",
    "dispatch_config",
    "low_latency_rdma_size_hint",
    "topk_idx_t",
]

#: dtype of `topk_idx` tensors (DeepEP exposes the same name; it is int64 unless DeepEP is built otherwise).
topk_idx_t = torch.int64

# DeepEP's NUM_MAX_NVL_PEERS: ranks of one node reachable over NVLink.
_NVL_PEERS = 8


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _as_int(name: str, value: object) -> int:
    # operator.index accepts int-like objects (numpy ints) but not floats or strings; bool is an int
    # subclass that would slip through silently, so it is refused explicitly.
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


class Config:
    """Chunking parameters of the normal-mode (high-throughput) kernels, with DeepEP's checks.

    `Config(num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
    num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256)`.

    `num_max_rdma_chunked_recv_tokens` is rounded up to a multiple of `num_max_rdma_chunked_send_tokens`
    (so the default reads back as 258). No backend has DeepEP's chunked queues, so the chunk sizes only enter
    the size hints; dispatch and combine read `num_sms` alone (the cuda kernels' SM budget, and `num_sms // 2`,
    the channel count that shapes the `channel_prefix_matrix` handle items).
    Instances are immutable, comparable and hashable.
    """

    __slots__ = (
        "_num_max_nvl_chunked_recv_tokens",
        "_num_max_nvl_chunked_send_tokens",
        "_num_max_rdma_chunked_recv_tokens",
        "_num_max_rdma_chunked_send_tokens",
        "_num_sms",
    )

    def __init__(
        self,
        num_sms: int = 20,
        num_max_nvl_chunked_send_tokens: int = 6,
        num_max_nvl_chunked_recv_tokens: int = 256,
        num_max_rdma_chunked_send_tokens: int = 6,
        num_max_rdma_chunked_recv_tokens: int = 256,
    ) -> None:
        num_sms = _as_int("num_sms", num_sms)
        nvl_send = _as_int("num_max_nvl_chunked_send_tokens", num_max_nvl_chunked_send_tokens)
        nvl_recv = _as_int("num_max_nvl_chunked_recv_tokens", num_max_nvl_chunked_recv_tokens)
        rdma_send = _as_int("num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens)
        rdma_recv = _as_int("num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens)

        if num_sms < 0:
            raise ValueError(f"num_sms={num_sms} must be >= 0")
        if nvl_send <= 0:
            raise ValueError(f"num_max_nvl_chunked_send_tokens={nvl_send} must be > 0")
        if nvl_send >= nvl_recv:
            raise ValueError(
                f"num_max_nvl_chunked_send_tokens={nvl_send} must be < num_max_nvl_chunked_recv_tokens={nvl_recv}"
            )
        if rdma_send <= 0:
            raise ValueError(f"num_max_rdma_chunked_send_tokens={rdma_send} must be > 0")
        if rdma_recv <= 0:
            raise ValueError(f"num_max_rdma_chunked_recv_tokens={rdma_recv} must be > 0")
        aligned = _align_up(rdma_recv, rdma_send)
        # After alignment `aligned` is a multiple of rdma_send, so "send < recv" already implies
        # "send <= recv / 2"; both are kept because they are DeepEP's two separate checks.
        if rdma_send >= aligned or 2 * rdma_send > aligned:
            raise ValueError(
                f"num_max_rdma_chunked_send_tokens={rdma_send} must be < and at most half of "
                f"num_max_rdma_chunked_recv_tokens={rdma_recv} (aligned up to {aligned})"
            )

        self._num_sms = num_sms
        self._num_max_nvl_chunked_send_tokens = nvl_send
        self._num_max_nvl_chunked_recv_tokens = nvl_recv
        self._num_max_rdma_chunked_send_tokens = rdma_send
        self._num_max_rdma_chunked_recv_tokens = aligned

    @property
    def num_sms(self) -> int:
        return self._num_sms

    @property
    def num_max_nvl_chunked_send_tokens(self) -> int:
        return self._num_max_nvl_chunked_send_tokens

    @property
    def num_max_nvl_chunked_recv_tokens(self) -> int:
        return self._num_max_nvl_chunked_recv_tokens

    @property
    def num_max_rdma_chunked_send_tokens(self) -> int:
        return self._num_max_rdma_chunked_send_tokens

    @property
    def num_max_rdma_chunked_recv_tokens(self) -> int:
        """Aligned up to a multiple of `num_max_rdma_chunked_send_tokens`."""
        return self._num_max_rdma_chunked_recv_tokens

    def _fields(self) -> tuple[int, int, int, int, int]:
        return (
            self._num_sms,
            self._num_max_nvl_chunked_send_tokens,
            self._num_max_nvl_chunked_recv_tokens,
            self._num_max_rdma_chunked_send_tokens,
            self._num_max_rdma_chunked_recv_tokens,
        )

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer DeepEP's normal kernels need for rows of `hidden_bytes` bytes on `num_ranks`."""
        hidden_bytes, num_ranks = self._check_hint_args(hidden_bytes, num_ranks)
        channels = self._num_sms // 2
        num_rdma_ranks = max(num_ranks // _NVL_PEERS, 1)
        num_nvl_ranks = min(num_ranks, _NVL_PEERS)
        # Per received token: payload, source meta (8), top-k ids (128 * 8), top-k weights and scales (128 * 4 each).
        per_token = hidden_bytes + 8 + 128 * 8 + 128 * 4 + 128 * 4
        num_bytes = channels * num_nvl_ranks * (2 * num_rdma_ranks + 3) * 4
        num_bytes += channels * num_nvl_ranks * self._num_max_nvl_chunked_recv_tokens * per_token
        return _align_up(num_bytes, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of RDMA buffer for the internode normal kernels; 0 when all ranks fit in one node (`R <= 8`)."""
        hidden_bytes, num_ranks = self._check_hint_args(hidden_bytes, num_ranks)
        if num_ranks <= _NVL_PEERS:
            return 0
        channels = self._num_sms // 2
        num_rdma_ranks = max(num_ranks // _NVL_PEERS, 1)
        # As for NVL plus 16 bytes of per-token RDMA bookkeeping; the factor 2 is the send and receive halves.
        per_token = hidden_bytes + 8 + 128 * 8 + 128 * 4 + 128 * 4 + 16
        num_bytes = channels * num_rdma_ranks * 18 * 2 * 4
        num_bytes += 2 * channels * num_rdma_ranks * self._num_max_rdma_chunked_recv_tokens * per_token
        return _align_up(num_bytes, 128)

    @staticmethod
    def _check_hint_args(hidden_bytes: int, num_ranks: int) -> tuple[int, int]:
        hidden_bytes = _as_int("hidden_bytes", hidden_bytes)
        num_ranks = _as_int("num_ranks", num_ranks)
        if hidden_bytes < 0:
            raise ValueError(f"hidden_bytes={hidden_bytes} must be >= 0")
        if num_ranks < 1:
            raise ValueError(f"num_ranks={num_ranks} must be >= 1")
        return hidden_bytes, num_ranks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"Config(num_sms={self._num_sms}, "
            f"num_max_nvl_chunked_send_tokens={self._num_max_nvl_chunked_send_tokens}, "
            f"num_max_nvl_chunked_recv_tokens={self._num_max_nvl_chunked_recv_tokens}, "
            f"num_max_rdma_chunked_send_tokens={self._num_max_rdma_chunked_send_tokens}, "
            f"num_max_rdma_chunked_recv_tokens={self._num_max_rdma_chunked_recv_tokens})"
        )


# DeepEP's tuned tables (deepseek-ai/DeepEP `Buffer.get_dispatch_config` / `get_combine_config`), as
# (nvl_send, nvl_recv, rdma_send, rdma_recv); num_sms comes from the caller (DeepEP uses `Buffer.num_sms`).
_DISPATCH_TABLE: dict[int, tuple[int, int, int, int]] = {
    2: (24, 256, 6, 128),
    4: (6, 256, 6, 128),
    8: (6, 256, 6, 128),
    16: (36, 288, 20, 128),
    24: (32, 288, 8, 128),
    32: (32, 288, 8, 128),
    48: (32, 288, 8, 128),
    64: (32, 288, 8, 128),
    96: (20, 480, 12, 128),
    128: (20, 560, 12, 128),
    144: (32, 720, 12, 128),
    160: (28, 720, 12, 128),
}
_COMBINE_TABLE: dict[int, tuple[int, int, int, int]] = {
    2: (10, 256, 6, 128),
    4: (9, 256, 6, 128),
    8: (4, 256, 6, 128),
    16: (4, 288, 12, 128),
    24: (1, 288, 8, 128),
    32: (1, 288, 8, 128),
    48: (1, 288, 8, 128),
    64: (1, 288, 8, 128),
    96: (1, 480, 8, 128),
    128: (1, 560, 8, 128),
    144: (2, 720, 8, 128),
    160: (2, 720, 8, 128),
}


def _table_key(num_ranks: int) -> int:
    # Unknown sizes borrow the smallest known size >= num_ranks: its receive queues were tuned for at least as
    # many peers, so they are never too small. Beyond the table the largest entry is the closest tuning we have.
    num_ranks = _as_int("num_ranks", num_ranks)
    if num_ranks < 1:
        raise ValueError(f"num_ranks={num_ranks} must be >= 1")
    return _smallest_known_size(num_ranks)


@functools.lru_cache(maxsize=64)
def _smallest_known_size(num_ranks: int) -> int:
    return min((k for k in _DISPATCH_TABLE if k >= num_ranks), default=max(_DISPATCH_TABLE))


def dispatch_config(num_ranks: int, *, num_sms: int = 20) -> Config:
    """DeepEP's recommended normal-mode dispatch `Config` for a group of `num_ranks`.

    Sizes DeepEP knows (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160) get DeepEP's table entry. Any other
    `num_ranks >= 1` gets the entry of the smallest known size above it (1 -> 2, 5 -> 8, 40 -> 48), and sizes
    above 160 get the 160 entry. `num_sms` is the caller's `Buffer.num_sms`. `num_ranks < 1` is a ValueError.
    """
    return _tuned_config("dispatch", _table_key(num_ranks), _as_int("num_sms", num_sms))


def combine_config(num_ranks: int, *, num_sms: int = 20) -> Config:
    """DeepEP's recommended normal-mode combine `Config`; unknown sizes follow the `dispatch_config` rule."""
    return _tuned_config("combine", _table_key(num_ranks), _as_int("num_sms", num_sms))


@functools.lru_cache(maxsize=64)
def _tuned_config(kind: str, table_key: int, num_sms: int) -> Config:
    # Every dispatch and combine without a config asks for one: Configs are immutable, so each is built once.
    return Config(num_sms, *(_DISPATCH_TABLE if kind == "dispatch" else _COMBINE_TABLE)[table_key])


def low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Bytes of RDMA buffer DeepEP's low-latency kernels need (DeepEP's formula, bf16 sizing, SPEC section 1).

    Two symmetric halves (double buffering), each holding a send region, a receive region and per-expert
    signalling counters. `num_ranks` does not enter DeepEP's formula; it is validated and accepted for the
    signature's sake.
    """
    t = _as_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
    hidden = _as_int("hidden", hidden)
    num_ranks = _as_int("num_ranks", num_ranks)
    e = _as_int("num_experts", num_experts)
    for name, value in (
        ("num_max_dispatch_tokens_per_rank", t),
        ("hidden", hidden),
        ("num_ranks", num_ranks),
        ("num_experts", e),
    ):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    num_scales = hidden // 128
    # A dispatch message is a 16-byte header plus either bf16 data or fp8 data with fp32 scales.
    dispatch_msg = 16 + max(2 * hidden, hidden + 4 * num_scales)
    combine_msg = 4 * num_scales + 2 * hidden
    send = max(t * dispatch_msg, e * t * combine_msg)
    recv = max(e * t * dispatch_msg, e * t * combine_msg)
    signaling = _align_up(4 * e, 128)
    total = 2 * (send + recv + signaling)
    return (total + 128) // 128 * 128
