"""deep_ep.quant against an independent scalar formulation of SPEC 6.1 / 6.2.

The oracle below works on Python floats one element at a time: each float32 operation is done in float64 and
rounded to float32 with `struct`, which is exactly the correctly rounded float32 result for one +, *, / of
float32 operands (float64 carries more than 2 * 24 + 2 bits). e4m3 rounding is a nearest-value search over a
table decoded from the bit layout, so neither side relies on torch's division or float8 conversion.
"""

from __future__ import annotations

import bisect
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deep_ep.quant import (
    dequantize_fp8,
    dequantize_int8,
    pack_ue8m0,
    per_block_cast_to_fp8,
    per_token_cast_to_int8,
    unpack_ue8m0,
)

# ---------------------------------------------------------------------------------------------------------------
# Scalar oracle


def f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def bits_f32(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b))[0]


def _e4m3_decode(code: int) -> float:
    exp, man = (code >> 3) & 0xF, code & 0x7
    mag = man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
    return -mag if code & 0x80 else mag


# Non-negative finite codes 0x00..0x7E are increasing in value (0x7F is NaN in e4m3fn).
E4M3_VALUES = [_e4m3_decode(c) for c in range(0x7F)]
assert E4M3_VALUES[-1] == 448.0


def e4m3_encode(v: float) -> int:
    """Round-to-nearest-even e4m3fn code of `v`, |v| <= 448."""
    mag = abs(v)
    lo = bisect.bisect_right(E4M3_VALUES, mag) - 1
    if E4M3_VALUES[lo] != mag:
        d_lo, d_hi = mag - E4M3_VALUES[lo], E4M3_VALUES[lo + 1] - mag
        if d_hi < d_lo or (d_hi == d_lo and lo % 2 == 1):
            lo += 1
    return lo | (0x80 if math.copysign(1.0, v) < 0 else 0)


INV_448 = f32(1 / 448)


def ref_fp8_block(block: list[float], round_scale: bool) -> tuple[list[int], float]:
    amax = max([f32(1e-4)] + [abs(v) for v in block])
    if round_scale:
        bits = f32_bits(f32(amax * INV_448))
        exponent = ((bits >> 23) & 0xFF) + (1 if bits & 0x7FFFFF else 0)
        scale_inv = bits_f32(exponent << 23)
        scale = f32(1 / scale_inv)
    else:
        scale_inv = f32(amax * INV_448)
        scale = f32(448 / amax)
    return [e4m3_encode(min(max(f32(v * scale), -448.0), 448.0)) for v in block], scale_inv


def ref_fp8(x: torch.Tensor, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes [N, H] and float32 scale_inv [N, H // 128]."""
    codes, scales = [], []
    for row in x.float().tolist():
        out = [ref_fp8_block(row[i : i + 128], round_scale) for i in range(0, len(row), 128)]
        codes.append([c for block_codes, _ in out for c in block_codes])
        scales.append([s for _, s in out])
    n, h = x.shape
    return (
        torch.tensor(codes, dtype=torch.uint8).reshape(n, h),
        torch.tensor(scales, dtype=torch.float32).reshape(n, h // 128),
    )


def ref_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qs, scales = [], []
    for row in x.float().tolist():
        amax = max([abs(v) for v in row], default=0.0)
        s = f32(127 / max(amax, f32(1e-12)))
        qs.append([round(f32(v * s)) for v in row])  # round() is half-to-even
        scales.append(f32(1 / s))
    return torch.tensor(qs, dtype=torch.int8).reshape(x.shape), torch.tensor(scales, dtype=torch.float32)


def codes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def bf16(values: list[float] | list[list[float]]) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    out = t.to(torch.bfloat16)
    assert torch.equal(out.float(), t), "test values must be exact in bf16"
    return out


def random_bf16(seed: int, n: int, h: int, log2_mag: int = 0, block_spread: int = 0) -> torch.Tensor:
    """Gaussian rows; each 128-block scaled by 2^(log2_mag + U[-block_spread, block_spread])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h // 128, 128, generator=g)
    exps = torch.randint(-block_spread, block_spread + 1, (n, h // 128, 1), generator=g) + log2_mag
    return (x * torch.exp2(exps.float())).reshape(n, h).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# fp8


@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_matches_oracle_for_every_bf16_amax_mantissa(round_scale):
    # Row i has block amax = (1 + i/128) * 2^e, covering all 128 bf16 mantissas at a few exponents. For about a
    # quarter of them `448.0 / amax` (reciprocal times 448) differs from the true quotient, so this catches it.
    mant = torch.arange(128, dtype=torch.float32)
    amax = torch.cat([(1 + mant / 128) * 2.0**e for e in (-3, 0, 7)])
    x = random_bf16(7, amax.numel(), 128).float().clamp(-0.99, 0.99) * amax[:, None]
    x[:, 5] = amax
    x = x.to(torch.bfloat16)
    q, s = per_block_cast_to_fp8(x, round_scale=round_scale)
    ref_q, ref_s = ref_fp8(x, round_scale)
    assert torch.equal(codes(q), ref_q)
    assert torch.equal(s.view(torch.int32), ref_s.view(torch.int32))


def test_fp8_inv448_is_the_float32_quotient():
    # scale_inv of a block whose amax is 1.0 is exactly the float32 constant 1/448.
    _, s = per_block_cast_to_fp8(bf16([[1.0] + [0.0] * 127]))
    assert s.item() == f32(1 / 448)


def test_fp8_saturates_at_448():
    # For amax = 1.2109375, fp32(448 / amax) * amax rounds to just above 448: the clamp keeps it at 448.
    for amax in (1.2109375, 448.0, 3.0, 2.0**-10):
        x = bf16([[amax, -amax] + [0.0] * 126])
        for round_scale in (False, True):
            q, _ = per_block_cast_to_fp8(x, round_scale=round_scale)
            assert q.float().abs().max().item() <= 448.0
            if not round_scale:
                assert codes(q)[0, :2].tolist() == [0x7E, 0xFE]  # +-448 exactly


def test_fp8_ties_round_to_even():
    # amax = 448 makes scale exactly 1, so x * scale is x and lands exactly between two e4m3 values.
    row = [448.0, 1.0625, 1.1875, -1.0625, 2.0**-10, 3 * 2.0**-10, 0.0, -0.0] + [0.0] * 120
    q, s = per_block_cast_to_fp8(bf16([row]))
    assert s.item() == f32(448 * INV_448)
    assert codes(q)[0, :8].tolist() == [0x7E, 0x38, 0x3A, 0xB8, 0x00, 0x02, 0x00, 0x80]


def test_fp8_zero_rows_use_the_amax_floor():
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    q, s = per_block_cast_to_fp8(x)
    assert torch.equal(codes(q), torch.zeros(2, 256, dtype=torch.uint8))
    assert torch.equal(s, torch.full((2, 2), f32(f32(1e-4) * INV_448)))
    _, s = per_block_cast_to_fp8(x, round_scale=True)
    assert torch.equal(s, torch.full((2, 2), 2.0**-22))  # 1e-4 / 448 = 2.2e-7 lies in (2^-23, 2^-22]
    q, packed = per_block_cast_to_fp8(torch.zeros(1, 512, dtype=torch.bfloat16), round_scale=True, use_ue8m0=True)
    assert packed.tolist() == [[(127 - 22) * 0x01010101]]


def test_fp8_blocks_are_independent():
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    x[0, 0], x[0, 128] = 2.0, 64.0
    q, s = per_block_cast_to_fp8(x)
    assert s.tolist() == [[f32(2 * INV_448), f32(64 * INV_448)]]
    assert q.float()[0, [0, 128]].tolist() == [448.0, 448.0]


@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)])
def test_fp8_nan_block_gets_a_nan_scale_and_nan_bytes(round_scale, use_ue8m0):
    # docs/SEMANTICS.md, for every scale option: rounding a NaN scale up must not carry into the sign bit (-0.0).
    x = torch.ones(1, 512, dtype=torch.bfloat16)
    x[0, 3] = float("nan")
    x[0, 128 + 5] = float("inf")
    q, s = per_block_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
    assert all((c & 0x7F) == 0x7F for c in codes(q)[0, :128].tolist())  # every byte of the NaN block is a NaN
    assert codes(q)[0, 129].item() == 0 and (codes(q)[0, 133].item() & 0x7F) == 0x7F  # 1 * 0 = 0, inf * 0 = NaN
    if use_ue8m0:
        assert s[0, 0].item() & 0xFFFF == 0xFFFF  # exponent bytes 0xFF (UE8M0's NaN), never 0x00 (2^-127)
    else:
        assert math.isnan(s[0, 0].item()) and s[0, 1].item() == math.inf


def test_fp8_round_scale_is_power_of_two_ceiling():
    x = random_bf16(3, 4, 512, log2_mag=5, block_spread=10)
    _, s = per_block_cast_to_fp8(x, round_scale=True)
    _, plain = per_block_cast_to_fp8(x)
    mantissa, _ = torch.frexp(s)
    assert torch.all(mantissa == 0.5)  # powers of two
    assert torch.all(s >= plain) and torch.all(s < 2 * plain)


@settings(max_examples=50, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 3),
    groups=st.integers(1, 2),
    log2_mag=st.integers(-40, 40),
    block_spread=st.integers(0, 12),
    round_scale=st.booleans(),
    use_ue8m0=st.booleans(),
)
def test_fp8_property(seed, n, groups, log2_mag, block_spread, round_scale, use_ue8m0):
    use_ue8m0 = use_ue8m0 and round_scale
    h = 512 * groups
    x = random_bf16(seed, n, h, log2_mag, block_spread)
    if n > 1:
        x[1, :128] = 0  # a zero block among live ones
    q, s = per_block_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
    ref_q, ref_s = ref_fp8(x, round_scale)
    assert q.shape == (n, h) and q.dtype == torch.float8_e4m3fn
    assert torch.equal(codes(q), ref_q)
    scale_inv = unpack_ue8m0(s) if use_ue8m0 else s
    assert s.shape == (n, h // 512 if use_ue8m0 else h // 128)
    assert torch.equal(scale_inv.view(torch.int32), ref_s.view(torch.int32))

    # Round trip. With v = x * scale: e4m3 keeps 3 mantissa bits, so |q - v| <= 2^-4 |v| for normal v and
    # <= 2^-10 (half the subnormal step) below 2^-6. Dequantising multiplies by scale_inv ~ 1 / scale with a
    # few float32 roundings (<= 2^-20 |x|), which together stay within 2^-4 |x| + 2^-9 scale_inv.
    deq = dequantize_fp8(q, s)
    err = (deq - x.float()).abs()
    bound = 2.0**-4 * x.float().abs() + 2.0**-9 * scale_inv.repeat_interleave(128, dim=-1)
    assert torch.all(err <= bound)


def test_fp8_leading_dims_and_empty():
    x = random_bf16(11, 6, 512).reshape(2, 3, 512)
    q, s = per_block_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    q2, s2 = per_block_cast_to_fp8(x.reshape(6, 512), round_scale=True, use_ue8m0=True)
    assert q.shape == (2, 3, 512) and s.shape == (2, 3, 1)
    assert torch.equal(codes(q).reshape(6, 512), codes(q2)) and torch.equal(s.reshape(6, 1), s2)
    assert torch.equal(dequantize_fp8(q, s).reshape(6, 512), dequantize_fp8(q2, s2))

    q, s = per_block_cast_to_fp8(torch.empty(0, 256, dtype=torch.bfloat16))
    assert q.shape == (0, 256) and s.shape == (0, 2) and s.dtype == torch.float32
    assert dequantize_fp8(q, s).shape == (0, 256)


def test_fp8_accepts_non_contiguous_input():
    x = random_bf16(5, 256, 4 * 128).t()  # [512, 256] with strides (1, 512)
    q, s = per_block_cast_to_fp8(x)
    q2, s2 = per_block_cast_to_fp8(x.contiguous())
    assert torch.equal(codes(q), codes(q2)) and torch.equal(s, s2)


# ---------------------------------------------------------------------------------------------------------------
# UE8M0 packing and scale layout


def test_ue8m0_byte_order():
    scale_inv = torch.tensor([[0.5, 1.0, 2.0, 4.0, 2.0**-127, 2.0**-126, 2.0**127, 1.0]])
    packed = pack_ue8m0(scale_inv)
    b0 = 126 | 127 << 8 | 128 << 16 | 129 << 24  # byte 0 = block 0, least significant
    b1 = 0 | 1 << 8 | 254 << 16 | 127 << 24  # 2^-127 is subnormal: exponent byte 0
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[b0 - 2**32, b1]]  # b0 has the top bit set: a negative int32
    # On a little-endian host the same bytes are the memory image.
    assert packed.view(torch.uint8).tolist() == [[126, 127, 128, 129, 0, 1, 254, 127]]


def test_ue8m0_round_trip():
    exps = torch.randint(1, 255, (3, 5, 16), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    scale_inv = (exps << 23).view(torch.float32)
    packed = pack_ue8m0(scale_inv)
    assert packed.shape == (3, 5, 4)
    assert torch.equal(unpack_ue8m0(packed), scale_inv)
    # Packing keeps only the exponent: a non-power-of-two drops its mantissa (rounds toward zero).
    assert unpack_ue8m0(pack_ue8m0(torch.tensor([3.0, 1.5, 0.75, 1.0]))).tolist() == [2.0, 1.0, 0.5, 1.0]


def test_column_major_scales():
    # SPEC 6: low-latency scales are [L, R*T, S] with strides (R*T*S, 1, R*T). Casting, packing, unpacking and
    # dequantising read any strides, so the same values come out of either layout.
    num_local, rows, h = 2, 3, 1024
    x = random_bf16(9, num_local * rows, h, block_spread=6).reshape(num_local, rows, h)
    q, s = per_block_cast_to_fp8(x, round_scale=True)
    s_col = s.transpose(1, 2).contiguous().transpose(1, 2)
    assert s_col.stride() == (rows * h // 128, 1, rows)
    assert torch.equal(dequantize_fp8(q, s_col), dequantize_fp8(q, s))

    packed = pack_ue8m0(s_col)
    assert torch.equal(packed, pack_ue8m0(s))
    packed_col = packed.transpose(1, 2).contiguous().transpose(1, 2)
    assert packed_col.stride() == (rows * h // 512, 1, rows)
    assert torch.equal(unpack_ue8m0(packed_col), s)
    assert torch.equal(dequantize_fp8(q, packed_col), dequantize_fp8(q, s))


# ---------------------------------------------------------------------------------------------------------------
# int8


def test_int8_ties_round_half_to_even():
    # amax = 127 gives s = 1 exactly, amax = 254 gives s = 0.5, so these land exactly on .5.
    q, scale = per_token_cast_to_int8(bf16([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 126.5, -127.0]]))
    assert q.tolist() == [[127, 0, 2, 2, -2, 0, 126, -127]]
    assert scale.tolist() == [1.0]
    q, scale = per_token_cast_to_int8(bf16([[254.0, 5.0, 7.0, -7.0, 1.0, 3.0]]))
    assert q.tolist() == [[127, 2, 4, -4, 0, 2]]
    assert scale.tolist() == [2.0]


def test_int8_zero_rows_and_empty():
    q, scale = per_token_cast_to_int8(torch.zeros(2, 16, dtype=torch.bfloat16))
    assert torch.equal(q, torch.zeros(2, 16, dtype=torch.int8))
    assert scale.tolist() == [f32(1 / f32(127 / f32(1e-12)))] * 2
    q, scale = per_token_cast_to_int8(torch.empty(0, 16, dtype=torch.bfloat16))
    assert q.shape == (0, 16) and scale.shape == (0,)
    assert dequantize_int8(q, scale).shape == (0, 16)


def test_int8_scale_is_reciprocal_not_amax_over_127():
    # 1 / (127 / amax) and amax / 127 differ in the last bit for some amax; the SPEC sends the former.
    x = torch.linspace(1, 3, 257).to(torch.bfloat16).unique()[:, None].expand(-1, 4).contiguous()
    _, scale = per_token_cast_to_int8(x)
    amaxes = x[:, 0].float().tolist()
    assert scale.tolist() == [f32(1 / f32(127 / a)) for a in amaxes]
    assert any(f32(1 / f32(127 / a)) != f32(a / 127) for a in amaxes)  # the distinction is real


@settings(max_examples=50, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 4),
    h=st.integers(1, 300),
    log2_mag=st.integers(-50, 50),
    block_spread=st.integers(0, 12),
)
def test_int8_property(seed, n, h, log2_mag, block_spread):
    g = torch.Generator().manual_seed(seed)
    spread = torch.randint(-block_spread, block_spread + 1, (n, 1), generator=g) + log2_mag
    x = (torch.randn(n, h, generator=g) * torch.exp2(spread.float())).to(torch.bfloat16)
    if n > 1:
        x[1] = 0
    q, scale = per_token_cast_to_int8(x)
    ref_q, ref_scale = ref_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (n,)
    assert torch.equal(q, ref_q)
    assert torch.equal(scale.view(torch.int32), ref_scale.view(torch.int32))

    # |x*s - q| <= 1/2, so |x - q*scale| <= scale/2 plus the float32 roundings of x*s, 1/s and q*scale,
    # each within 2^-24 relative of a value <= amax.
    err = (dequantize_int8(q, scale) - x.float()).abs()
    amax = x.float().abs().amax(dim=-1, keepdim=True) if h else torch.zeros(n, 1)
    assert torch.all(err <= scale[:, None] / 2 + amax * 2.0**-21)


def test_int8_leading_dims():
    x = random_bf16(2, 6, 128).reshape(2, 3, 128)
    q, scale = per_token_cast_to_int8(x)
    q2, scale2 = per_token_cast_to_int8(x.reshape(6, 128))
    assert q.shape == (2, 3, 128) and scale.shape == (2, 3)
    assert torch.equal(q.reshape(6, 128), q2) and torch.equal(scale.reshape(6), scale2)
    assert torch.equal(dequantize_int8(q, scale).reshape(6, 128), dequantize_int8(q2, scale2))


# ---------------------------------------------------------------------------------------------------------------
# Argument checking


def test_fp8_argument_errors():
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x must have dtype"):
        per_block_cast_to_fp8(x.to(torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        per_block_cast_to_fp8([[0.0] * 128])
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=200 must be a multiple of 128"):
        per_block_cast_to_fp8(torch.zeros(2, 200, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="use_ue8m0=True requires round_scale=True"):
        per_block_cast_to_fp8(torch.zeros(2, 512, dtype=torch.bfloat16), use_ue8m0=True)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=256 must be a multiple of 512"):
        per_block_cast_to_fp8(x, round_scale=True, use_ue8m0=True)


def test_pack_and_dequantize_argument_errors():
    with pytest.raises(TypeError, match="scale_inv must have dtype torch.float32"):
        pack_ue8m0(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"scale_inv.shape\[-1\]=6 must be a multiple of 4"):
        pack_ue8m0(torch.ones(2, 6))
    with pytest.raises(TypeError, match="packed must have dtype torch.int32"):
        unpack_ue8m0(torch.ones(2, 1, dtype=torch.int64))
    q, s = per_block_cast_to_fp8(torch.zeros(2, 256, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="q must have dtype torch.float8_e4m3fn"):
        dequantize_fp8(q.float(), s)
    with pytest.raises(ValueError, match="scales shape"):
        dequantize_fp8(q, s[:, :1])
    with pytest.raises(TypeError, match="x must have dtype"):
        per_token_cast_to_int8(torch.zeros(2, 4, dtype=torch.int8))
    q8, scale = per_token_cast_to_int8(torch.zeros(2, 4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="q must have dtype torch.int8"):
        dequantize_int8(q8.float(), scale)
    with pytest.raises(TypeError, match="scale must be a float32 tensor"):
        dequantize_int8(q8, scale.double())
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_int8(q8, scale[:1])
