"""Quantisation casts of SPEC sections 6.1 (fp8, DeepEP format) and 6.2 (int8, Ascend format).

Written one token and one block at a time with Python floats on purpose: the package's casts are
vectorised torch code, and an oracle that shared their structure would share their mistakes.

Every float32 operation is a Python (binary64) operation on float32 operands followed by `_f32`, a
round-to-nearest-even conversion to float32. For +, -, * and / of two float32 values this gives the
correctly rounded float32 result: binary64 has 53 >= 2 * 24 + 2 significand bits, so the double rounding
is innocuous. Inputs are assumed finite (the SPEC says nothing about NaN or Inf).
"""

from __future__ import annotations

import math
import struct

import torch

__all__ = ["FP8_BLOCK", "UE8M0_PACK", "fp8_cast", "int8_cast"]

FP8_BLOCK = 128  # channels sharing one scale (SPEC 6.1)
UE8M0_PACK = 4  # ue8m0 exponent bytes per int32 word

_E4M3_MAX = 448.0
_E4M3_MANTISSA_BITS = 3
_E4M3_MIN_NORMAL_EXP = -6  # 2**-6 is the smallest normal e4m3 value; subnormals share its quantum


def _f32(v: float) -> float:
    """Round a Python float to the nearest float32 (ties to even) and return it as a Python float."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _f32_bits(v: float) -> int:
    """The IEEE-754 binary32 bit pattern of `v` (which must already be a float32 value)."""
    return struct.unpack("<I", struct.pack("<f", v))[0]


# The SPEC's constants are float32 values; `1/448` is the float32 division 1.0f / 448.0f.
_AMAX_FLOOR_FP8 = _f32(1e-4)
_AMAX_FLOOR_INT8 = _f32(1e-12)
_INV_448 = _f32(1.0 / _E4M3_MAX)


def _e4m3_round(v: float) -> float:
    """Round a float32 value with |v| <= 448 to the nearest e4m3fn value, ties to even; keeps the sign of zero."""
    if v == 0.0:
        return v
    a = abs(v)
    _, e = math.frexp(a)  # a lies in [2**(e-1), 2**e)
    binade = max(e - 1, _E4M3_MIN_NORMAL_EXP)
    quantum = 2.0 ** (binade - _E4M3_MANTISSA_BITS)
    # a / quantum is exact (a power-of-two scaling) and Python's round() breaks ties to even.
    return math.copysign(round(a / quantum) * quantum, v)


def _fp8_block_scales(amax: float, round_scale: bool) -> tuple[float, float]:
    """(scale, scale_inv) of one 128-channel block whose floored amax is `amax` (SPEC 6.1)."""
    if not round_scale:
        scale = _f32(_E4M3_MAX / amax)
        scale_inv = _f32(amax * _INV_448)
        return scale, scale_inv
    # 2**ceil(log2(t)) read off the float bits: the unbiased exponent, plus one unless t is a power of two.
    t = _f32(amax * _INV_448)
    bits = _f32_bits(t)
    exponent = ((bits >> 23) & 0xFF) - 127
    if bits & 0x7FFFFF:
        exponent += 1
    scale_inv = 2.0**exponent
    scale = _f32(1.0 / scale_inv)
    return scale, scale_inv


def fp8_cast(x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 6.1: per token and 128-channel block e4m3 quantisation of `x` (bf16 `[N, H]`, `H % 128 == 0`).

    Returns `(q, scales)`: `q` float8_e4m3fn `[N, H]`; `scales` float32 `[N, H // 128]` holding
    `scale_inv`, or with `use_ue8m0` (requires `round_scale`, `H % 512 == 0`) int32 `[N, H // 512]` where
    byte `b` (least significant first) of word `j` is the exponent byte of block `4 * j + b`'s `scale_inv`.
    """
    if x.dim() != 2 or x.dtype != torch.bfloat16:
        raise ValueError(f"fp8_cast expects bf16 [N, H], got {x.dtype} {tuple(x.shape)}")
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True requires round_scale=True")
    num_tokens, hidden = x.shape
    if hidden % FP8_BLOCK != 0:
        raise ValueError(f"hidden={hidden} is not a multiple of {FP8_BLOCK}")
    if use_ue8m0 and hidden % (FP8_BLOCK * UE8M0_PACK) != 0:
        raise ValueError(f"hidden={hidden} is not a multiple of {FP8_BLOCK * UE8M0_PACK} (use_ue8m0=True)")
    num_blocks = hidden // FP8_BLOCK

    q_rows: list[list[float]] = []
    scale_inv_rows: list[list[float]] = []
    for row in x.float().tolist():  # bf16 -> Python float is exact
        q_row: list[float] = []
        scale_inv_row: list[float] = []
        for b in range(num_blocks):
            block = row[b * FP8_BLOCK : (b + 1) * FP8_BLOCK]
            amax = max(_AMAX_FLOOR_FP8, max(abs(v) for v in block))
            scale, scale_inv = _fp8_block_scales(amax, round_scale)
            for v in block:
                scaled = min(max(_f32(v * scale), -_E4M3_MAX), _E4M3_MAX)
                q_row.append(_e4m3_round(scaled))
            scale_inv_row.append(scale_inv)
        q_rows.append(q_row)
        scale_inv_rows.append(scale_inv_row)

    # Every value is already an e4m3 value, so the float32 -> e4m3 conversion below is exact.
    q = torch.tensor(q_rows, dtype=torch.float32).reshape(num_tokens, hidden).to(torch.float8_e4m3fn)
    if not use_ue8m0:
        return q, torch.tensor(scale_inv_rows, dtype=torch.float32).reshape(num_tokens, num_blocks)

    words: list[list[int]] = []
    for scale_inv_row in scale_inv_rows:
        exponent_bytes = [_f32_bits(s) >> 23 for s in scale_inv_row]  # scale_inv > 0: no sign bit
        words.append(
            [
                struct.unpack("<i", bytes(exponent_bytes[j * UE8M0_PACK : (j + 1) * UE8M0_PACK]))[0]
                for j in range(num_blocks // UE8M0_PACK)
            ]
        )
    return q, torch.tensor(words, dtype=torch.int32).reshape(num_tokens, num_blocks // UE8M0_PACK)


def int8_cast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 6.2: per token symmetric int8 quantisation of `x` (bf16 `[N, H]`).

    Returns `(q, scales)`: `q` int8 `[N, H]`, `scales` float32 `[N]` with `scale = 1 / s`,
    `s = 127 / max(amax, 1e-12)`; dequantise as `q * scale`.
    """
    if x.dim() != 2 or x.dtype != torch.bfloat16:
        raise ValueError(f"int8_cast expects bf16 [N, H], got {x.dtype} {tuple(x.shape)}")
    num_tokens, hidden = x.shape
    q_rows: list[list[int]] = []
    scales: list[float] = []
    for row in x.float().tolist():
        amax = max((abs(v) for v in row), default=0.0)
        s = _f32(127.0 / max(amax, _AMAX_FLOOR_INT8))
        q_row = [round(_f32(v * s)) for v in row]  # Python's round() of a float: nearest, ties to even
        assert all(-127 <= q <= 127 for q in q_row), "|x * s| <= 127 * (1 + 2**-24) cannot round past 127"
        q_rows.append(q_row)
        scales.append(_f32(1.0 / s))
    q = torch.tensor(q_rows, dtype=torch.int8).reshape(num_tokens, hidden)
    return q, torch.tensor(scales, dtype=torch.float32)
