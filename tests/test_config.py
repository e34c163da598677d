"""deep_ep.config: Config checks and size hints (SPEC 1, 2) and DeepEP's recommended tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deep_ep.config import Config, combine_config, dispatch_config, low_latency_rdma_size_hint, topk_idx_t

FIELDS = (
    "num_sms",
    "num_max_nvl_chunked_send_tokens",
    "num_max_nvl_chunked_recv_tokens",
    "num_max_rdma_chunked_send_tokens",
    "num_max_rdma_chunked_recv_tokens",
)


def fields(c: Config) -> tuple[int, ...]:
    return tuple(getattr(c, f) for f in FIELDS)


def test_defaults_and_rdma_alignment():
    # 256 is not a multiple of the rdma send chunk 6, so it reads back aligned up to 258.
    assert fields(Config()) == (20, 6, 256, 6, 258)


def test_positional_and_keyword_agree():
    by_position = Config(24, 8, 512, 16, 128)
    by_keyword = Config(**dict(zip(FIELDS, (24, 8, 512, 16, 128))))
    assert by_position == by_keyword
    assert fields(by_position) == (24, 8, 512, 16, 128)


def test_size_hint_check_values():
    # SPEC 2 check value.
    c = Config(24, 8, 512, 16, 128)
    assert c.get_nvl_buffer_size_hint(7168, 16) == 453380736
    assert c.get_rdma_buffer_size_hint(7168, 16) == 56774016


def test_size_hints_single_node():
    c = Config()
    # 10 channels, 8 NVL peers, 1 RDMA rank, bf16 hidden 7168 (14336 bytes):
    # 10*8*(2*1+3)*4 + 10*8*256*(14336 + 8 + 1024 + 512 + 512) = 335709760, aligned up to 128.
    assert c.get_nvl_buffer_size_hint(14336, 8) == 335709824
    for num_ranks in (1, 2, 3, 8):
        assert c.get_rdma_buffer_size_hint(14336, num_ranks) == 0
    assert c.get_rdma_buffer_size_hint(14336, 9) > 0
    assert c.get_nvl_buffer_size_hint(14336, 8) % 128 == 0


def test_hint_argument_errors():
    with pytest.raises(ValueError, match="num_ranks=0"):
        Config().get_nvl_buffer_size_hint(14336, 0)
    with pytest.raises(ValueError, match="hidden_bytes=-1"):
        Config().get_rdma_buffer_size_hint(-1, 16)
    with pytest.raises(TypeError, match="hidden_bytes must be an int"):
        Config().get_nvl_buffer_size_hint(1.5, 8)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 6, 256, 6, 256), "num_sms=-1"),
        ((20, 0, 256, 6, 256), "num_max_nvl_chunked_send_tokens=0"),
        ((20, -3, 256, 6, 256), "num_max_nvl_chunked_send_tokens=-3"),
        ((20, 256, 256, 6, 256), "num_max_nvl_chunked_send_tokens=256 must be < num_max_nvl_chunked_recv_tokens=256"),
        ((20, 6, 0, 6, 256), "num_max_nvl_chunked_send_tokens=6 must be < num_max_nvl_chunked_recv_tokens=0"),
        ((20, 6, 256, 0, 256), "num_max_rdma_chunked_send_tokens=0"),
        ((20, 6, 256, 6, 0), "num_max_rdma_chunked_recv_tokens=0"),
        # recv 6 aligns to 6: send is not below it.
        ((20, 6, 256, 6, 6), "num_max_rdma_chunked_send_tokens=6 must be <"),
        # recv 5 aligns up to 8 = send.
        ((20, 6, 256, 8, 5), r"num_max_rdma_chunked_recv_tokens=5 \(aligned up to 8\)"),
    ],
)
def test_invalid_values_raise(args, message):
    with pytest.raises(ValueError, match=message):
        Config(*args)


def test_smallest_valid_rdma_pair():
    # recv 7 aligns up to 8 = 2 * send: "send < recv" and "send <= recv / 2" both hold.
    assert Config(20, 6, 256, 4, 7).num_max_rdma_chunked_recv_tokens == 8
    assert fields(Config(0, 1, 2, 1, 2)) == (0, 1, 2, 1, 2)  # the smallest valid Config


def test_non_int_arguments_raise_type_error():
    with pytest.raises(TypeError, match="num_sms must be an int"):
        Config(20.0)
    with pytest.raises(TypeError, match="num_max_nvl_chunked_send_tokens must be an int, got bool"):
        Config(20, True)
    assert Config(torch.tensor(24).item()) == Config(24)


def test_immutable_eq_hash_repr():
    c = Config(24, 8, 512, 16, 128)
    with pytest.raises(AttributeError):
        c.num_sms = 4
    assert eval(repr(c), {"Config": Config}) == c
    assert hash(c) == hash(Config(24, 8, 512, 16, 128))
    assert c != Config(24, 8, 512, 16, 256)
    assert c != (24, 8, 512, 16, 128)
    # Equality is on the aligned value, as the kernels see it.
    assert Config(20, 6, 256, 6, 256) == Config(20, 6, 256, 6, 258)


@settings(max_examples=50, deadline=None, database=None)
@given(
    num_sms=st.integers(0, 200),
    nvl_send=st.integers(1, 64),
    nvl_extra=st.integers(1, 1024),
    rdma_send=st.integers(1, 64),
    rdma_recv=st.integers(1, 1024),
)
def test_config_property(num_sms, nvl_send, nvl_extra, rdma_send, rdma_recv):
    aligned = -(-rdma_recv // rdma_send) * rdma_send
    args = (num_sms, nvl_send, nvl_send + nvl_extra, rdma_send, rdma_recv)
    if aligned < 2 * rdma_send:
        with pytest.raises(ValueError, match="num_max_rdma_chunked_send_tokens"):
            Config(*args)
        return
    c = Config(*args)
    assert fields(c) == (num_sms, nvl_send, nvl_send + nvl_extra, rdma_send, aligned)
    for num_ranks in (1, 8, 16, 24):
        assert c.get_nvl_buffer_size_hint(7168, num_ranks) % 128 == 0
        assert c.get_rdma_buffer_size_hint(7168, num_ranks) % 128 == 0


# DeepEP's tables, read from deepseek-ai/DeepEP `deep_ep/buffers/legacy.py` (commit 189df346, the classic
# `Buffer.get_dispatch_config` / `get_combine_config`), as (nvl_send, nvl_recv, rdma_send, rdma_recv).
DEEPEP_DISPATCH = {
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
DEEPEP_COMBINE = {
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


@pytest.mark.parametrize("num_ranks", sorted(DEEPEP_DISPATCH))
def test_deepep_tables(num_ranks):
    assert dispatch_config(num_ranks) == Config(20, *DEEPEP_DISPATCH[num_ranks])
    assert combine_config(num_ranks) == Config(20, *DEEPEP_COMBINE[num_ranks])
    assert dispatch_config(num_ranks, num_sms=24).num_sms == 24
    assert combine_config(num_ranks, num_sms=24) == Config(24, *DEEPEP_COMBINE[num_ranks])


@pytest.mark.parametrize(
    ("num_ranks", "borrowed"),
    [
        (1, 2),
        (3, 4),
        (5, 8),
        (7, 8),
        (9, 16),
        (12, 16),
        (17, 24),
        (40, 48),
        (65, 96),
        (100, 128),
        (150, 160),
        (161, 160),
        (1000, 160),
    ],
)
def test_unknown_sizes_borrow_the_next_known_size(num_ranks, borrowed):
    assert dispatch_config(num_ranks) == dispatch_config(borrowed)
    assert combine_config(num_ranks) == combine_config(borrowed)


def test_table_argument_errors():
    for bad in (0, -8):
        with pytest.raises(ValueError, match=f"num_ranks={bad} must be >= 1"):
            dispatch_config(bad)
        with pytest.raises(ValueError, match=f"num_ranks={bad} must be >= 1"):
            combine_config(bad)
    with pytest.raises(TypeError, match="num_ranks must be an int"):
        dispatch_config(8.0)


def test_low_latency_rdma_size_hint():
    assert low_latency_rdma_size_hint(128, 7168, 8, 288) == 2146961792  # SPEC 1 example
    # T=1, H=128, E=1: dispatch msg 16+256, combine msg 4+256, send=recv=272, signals 128:
    # 2 * (272 + 272 + 128) = 1344, then (1344 + 128) // 128 * 128.
    assert low_latency_rdma_size_hint(1, 128, 1, 1) == 1408
    with pytest.raises(ValueError, match="num_experts=0"):
        low_latency_rdma_size_hint(128, 7168, 8, 0)
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank=0"):
        low_latency_rdma_size_hint(0, 7168, 8, 288)
    with pytest.raises(TypeError, match="hidden must be an int"):
        low_latency_rdma_size_hint(128, 7168.0, 8, 288)


def test_topk_idx_t():
    assert topk_idx_t is torch.int64


CHUNK_FIELDS = FIELDS[1:]


def _readme_config_section() -> str:
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    start = readme.index("### `Config(")
    return readme[start : readme.index("\n### ", start + 1)]


def test_unread_chunk_fields_are_documented():
    # The claim, checked on the code: no module but config.py (checks, hints) names a chunk field, so no backend
    # reads them. If one ever does, the README sentence below must change with it.
    package = Path(__file__).resolve().parent.parent / "deep_ep"
    readers = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "config.py" and any(field in path.read_text(encoding="utf-8") for field in CHUNK_FIELDS)
    ]
    assert readers == []
    # A DeepEP user tunes these (DeepEP's tests/test_intranode.py sweeps the NVL chunk size): the README must say
    # that here they change nothing, and that a cached dispatch / combine config need not match the handle.
    section = " ".join(_readme_config_section().split())
    assert "no backend reads them" in section
    assert "cached dispatch or a combine may pass a `config` whose `num_sms // 2` differs" in section


def _other_channel_counts(rank: int, world: int) -> bool:
    import torch.distributed as dist

    from deep_ep import Buffer

    buffer = Buffer(dist.group.WORLD)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(6, 16, generator=generator).to(torch.bfloat16)
    topk_idx = torch.randint(0, 4, (6, 2), generator=generator)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 4)
    own = Config(num_sms=4)  # 2 channels in the handle
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=own
    )
    same = []
    for other in (Config(num_sms=24), Config(num_sms=7)):  # another channel count, and an odd SM count
        same.append(torch.equal(buffer.dispatch(x, handle=handle, config=other)[0], recv_x))
        combined_own = buffer.combine(recv_x, handle, config=own)[0]
        same.append(torch.equal(buffer.combine(recv_x, handle, config=other)[0], combined_own))
    return all(same)


def test_cached_dispatch_and_combine_take_another_channel_count():
    # README (Config): the handle fixes the routing, so only a fresh dispatch's `num_sms // 2` matters.
    from deep_ep.testing import run_ranks

    assert run_ranks(2, _other_channel_counts) == [True, True]
