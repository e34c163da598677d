"""Bit-exact quantisation casts of the low-latency wire formats (SPEC sections 6.1 and 6.2).

All arithmetic is float32 with one rounding per operation. Two PyTorch habits would break bit equality
with a kernel that follows the SPEC, so they are avoided on purpose:
- `c / t` with a Python number `c` is computed as `t.reciprocal() * c` (two roundings); every division here
  divides two float32 tensors instead.
- No multiply is fused into an add (FMA): every step is a separate elementwise op, rounded on its own.
The functions are plain vectorised torch ops, so they run on any device and accept leading batch
dimensions: `x` is `[..., H]`, scales are `[..., S]`. Inputs are expected to be finite.
"""

from __future__ import annotations

import torch

__all__ = [
    "FP8_MAX",
    "dequantize_fp8",
    "dequantize_int8",
    "pack_ue8m0",
    "per_block_cast_to_fp8",
    "per_token_cast_to_int8",
    "unpack_ue8m0",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_BLOCK = 128  # channels per fp8 scale
_UE8M0_PER_INT = 4  # exponent bytes packed into one int32
_FP8_AMAX_FLOOR = 1e-4  # keeps all-zero blocks from dividing by zero
_INT8_AMAX_FLOOR = 1e-12  # likewise for all-zero int8 rows


def _check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {expected}, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got shape {tuple(t.shape)}")
    return t


def _fdiv(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """`numerator / t` as one correctly rounded float32 division per element (see module docstring)."""
    return torch.full_like(t, numerator) / t


# 1/448 as float32 division, the constant a kernel computes; a float64 1/448 rounded to float32 could differ.
_INV_FP8_MAX = (torch.tensor(1.0, dtype=torch.float32) / torch.tensor(FP8_MAX, dtype=torch.float32)).item()


def _pow2_ceil(t: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(t)) for positive normal float32 `t`, from the bits: exponent field, +1 if any mantissa bit.
    Infinity and NaN come back as they are (a NaN's +1 would carry into the sign bit: -0.0)."""
    bits = t.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    rounded = ((exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)) << 23).view(torch.float32)
    return torch.where(exponent == 0xFF, t, rounded)


def per_block_cast_to_fp8(
    x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP's fp8 format: e4m3 values with one scale per token and block of 128 channels.

    Args:
        x: `[..., H]` bfloat16 (float16/float32 also accepted and widened exactly), `H % 128 == 0`.
        round_scale: round each `scale_inv` up to a power of two.
        use_ue8m0: return the scales packed as UE8M0 bytes; needs `round_scale` and `H % 512 == 0`.

    Returns:
        `(q, scales)`: `q` float8_e4m3fn `[..., H]`; `scales` float32 `[..., H // 128]` holding `scale_inv`
        (dequantise as `q * scale_inv`), or with `use_ue8m0` int32 `[..., H // 512]` (see `pack_ue8m0`).
    """
    _check_tensor("x", x, (torch.bfloat16, torch.float16, torch.float32))
    hidden = x.shape[-1]
    if hidden % _BLOCK != 0:
        raise ValueError(f"x.shape[-1]={hidden} must be a multiple of {_BLOCK} for the fp8 format")
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True requires round_scale=True (UE8M0 holds only powers of two)")
    if use_ue8m0 and hidden % (_BLOCK * _UE8M0_PER_INT) != 0:
        raise ValueError(f"x.shape[-1]={hidden} must be a multiple of {_BLOCK * _UE8M0_PER_INT} with use_ue8m0=True")

    blocks = x.to(torch.float32).unflatten(-1, (hidden // _BLOCK, _BLOCK))  # [..., S, 128]
    amax = blocks.abs().amax(dim=-1).clamp_min(_FP8_AMAX_FLOOR)  # [..., S]
    if round_scale:
        scale_inv = _pow2_ceil(amax * _INV_FP8_MAX)
        scale = _fdiv(1.0, scale_inv)  # exact: the inverse of a power of two
    else:
        scale_inv = amax * _INV_FP8_MAX
        scale = _fdiv(FP8_MAX, amax)
    # The product can land a rounding above 448; the clamp keeps the cast from reaching e4m3fn's NaN code.
    q = (blocks * scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).flatten(-2)
    return q, pack_ue8m0(scale_inv) if use_ue8m0 else scale_inv


def pack_ue8m0(scale_inv: torch.Tensor) -> torch.Tensor:
    """Pack float32 scales `[..., S]` (`S % 4 == 0`) into int32 `[..., S // 4]`.

    Byte `i` (0 = least significant) of int32 `j` is the exponent byte `bits(scale_inv) >> 23` of block `4j + i`.
    Only the exponent is kept, so the scales should be positive powers of two (as with `round_scale`).
    Built arithmetically rather than by reinterpreting memory, so any layout and byte order work.
    """
    _check_tensor("scale_inv", scale_inv, (torch.float32,))
    num_scales = scale_inv.shape[-1]
    if num_scales % _UE8M0_PER_INT != 0:
        raise ValueError(f"scale_inv.shape[-1]={num_scales} must be a multiple of {_UE8M0_PER_INT}")
    exponent = ((scale_inv.view(torch.int32) >> 23) & 0xFF).to(torch.int64)
    exponent = exponent.unflatten(-1, (num_scales // _UE8M0_PER_INT, _UE8M0_PER_INT))
    shifts = torch.arange(0, 8 * _UE8M0_PER_INT, 8, dtype=torch.int64, device=scale_inv.device)
    packed = (exponent << shifts).sum(dim=-1)  # disjoint bytes, so the sum is an OR; in [0, 2^32)
    # Map to the int32 with the same 32 bits explicitly instead of relying on a wrapping narrowing cast.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_ue8m0`: int32 `[..., P]` to float32 `[..., 4 * P]` powers of two (`2^(byte - 127)`)."""
    _check_tensor("packed", packed, (torch.int32,))
    shifts = torch.arange(0, 8 * _UE8M0_PER_INT, 8, dtype=torch.int64, device=packed.device)
    exponent = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xFF  # [..., P, 4]
    return (exponent.flatten(-2) << 23).to(torch.int32).view(torch.float32)


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 `[..., H]` = `q * scale_inv` per 128-channel block.

    Args:
        q: float8_e4m3fn `[..., H]`.
        scales: float32 `[..., H // 128]` (`scale_inv`), or int32 `[..., H // 512]` UE8M0-packed. Any strides.
    """
    _check_tensor("q", q, (torch.float8_e4m3fn,))
    _check_tensor("scales", scales, (torch.float32, torch.int32))
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales)
    hidden = q.shape[-1]
    if hidden % _BLOCK != 0 or scales.shape != q.shape[:-1] + (hidden // _BLOCK,):
        raise ValueError(
            f"scales shape {tuple(scales.shape)} (after unpacking) does not match q shape {tuple(q.shape)}: "
            f"expected {tuple(q.shape[:-1]) + (hidden // _BLOCK,)}"
        )
    blocks = q.to(torch.float32).unflatten(-1, (hidden // _BLOCK, _BLOCK))
    return (blocks * scales.unsqueeze(-1)).flatten(-2)


def per_token_cast_to_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascend's int8 format: one scale per token (whole row).

    Args:
        x: `[..., H]` bfloat16 (float16/float32 also accepted and widened exactly).

    Returns:
        `(q, scale)`: `q` int8 `[..., H]` = round-half-even(`x * s`) with `s = 127 / max(amax, 1e-12)`;
        `scale` float32 `[...]` = `1 / s` (dequantise as `q * scale`).
    """
    _check_tensor("x", x, (torch.bfloat16, torch.float16, torch.float32))
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True) if xf.shape[-1] > 0 else xf.new_zeros(xf.shape[:-1] + (1,))
    s = _fdiv(127.0, amax.clamp_min(_INT8_AMAX_FLOOR))
    # torch.round rounds half to even; |x * s| <= 127 up to one rounding, so the int8 cast never overflows.
    q = torch.round(xf * s).to(torch.int8)
    return q, _fdiv(1.0, s).squeeze(-1)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 `[..., H]` = `q * scale`, for `q` int8 `[..., H]` and `scale` float32 `[...]`."""
    _check_tensor("q", q, (torch.int8,))
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise TypeError(f"scale must be a float32 tensor, got {got}")
    if scale.shape != q.shape[:-1]:
        raise ValueError(
            f"scale shape {tuple(scale.shape)} must equal q shape without its last dim {tuple(q.shape[:-1])}"
        )
    return q.to(torch.float32) * scale.unsqueeze(-1)
