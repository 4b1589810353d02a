"""MXFP4 (OCP Microscaling v1.0, E2M1 elements, E8M0 scales): the reference numerics.

This module is the specification every kernel is tested against. It runs on any device
and agrees bit for bit with microsoft/microxcaling's ``_quantize_mx`` (elem_format
fp4_e2m1, scale_bits 8, block 32, round "even").

- Blocks: ``BLOCK`` consecutive elements along the last dimension.
- Scale: X = 2^(floor(log2(max|v|)) - 2), stored as uint8 ``e + 127``; an all-zero block
  gets the smallest scale (code 0); the exponent is clamped to [-127, 127].
- Elements: E2M1 {0, .5, 1, 1.5, 2, 3, 4, 6} with sign, v/X rounded to nearest with ties
  to even, saturating at +-6. Code = sign << 3 | index.
- Packing: two codes per byte, element 2i in the low nibble, 2i+1 in the high nibble.
"""

from __future__ import annotations

import torch

BLOCK = 32
SCALE_BIAS = 127
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest E2M1 binade (4 and 6)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# 2 * |value| -> magnitude index, for the 8 non-negative grid points (others unused).
_DOUBLE_TO_INDEX = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8)


def e2m1_table(device=None, dtype=torch.float32) -> torch.Tensor:
    """The 16 code -> value entries (codes 8..15 are the negatives, 8 is -0)."""
    pos = torch.tensor(E2M1_VALUES, dtype=dtype, device=device)
    return torch.cat([pos, -pos])


def _check_blocks(x: torch.Tensor, block: int) -> None:
    if x.shape[-1] % block:
        raise ValueError(
            f"MXFP4 needs the last dimension to be a multiple of {block}, got shape {tuple(x.shape)}"
        )


def block_exponents(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Shared exponent e of each block (X = 2^e), int32 [..., K/block], clamped to [-127, 127]."""
    _check_blocks(x, block)
    wide = torch.promote_types(x.dtype, torch.float32)  # float64 keeps its range
    amax = x.to(wide).abs().unflatten(-1, (-1, block)).amax(-1)
    _, exp = torch.frexp(amax)  # amax = m * 2^exp, m in [0.5, 1): floor(log2 amax) = exp - 1
    e = exp.to(torch.int32) - 1 - E2M1_EMAX
    e = torch.where(amax == 0, torch.full_like(e, -SCALE_BIAS), e)
    e = torch.where(torch.isinf(amax), torch.full_like(e, SCALE_BIAS), e)  # frexp(inf) has no exponent
    return e.clamp(-SCALE_BIAS, SCALE_BIAS)


def round_to_e2m1(a: torch.Tensor) -> torch.Tensor:
    """Round float32 values (already divided by their block scale) onto the E2M1 grid:
    nearest, ties to even, saturating at +-6 (microxcaling's elementwise quantizer).

    E2M1 has one mantissa bit and minimum normal exponent 0, so the grid spacing is 0.5
    below 2, 1 in [2, 4) and 2 from 4 on; torch.round is half-to-even, which is the
    hardware's tie rule (ties land on the even code)."""
    mag = a.abs()
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0))
    q = torch.round(mag / step) * step  # dividing by a power of two is exact
    return torch.copysign(q.clamp(max=E2M1_MAX), a)


def quantize_codes(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (codes uint8 [..., K] in 0..15, scales uint8 [..., K/block])."""
    e = block_exponents(x, block)
    xf = x.float().unflatten(-1, (-1, block))
    a = xf * torch.exp2(-e.float()).unsqueeze(-1)
    q = round_to_e2m1(a)
    idx = _DOUBLE_TO_INDEX.to(x.device)[(q.abs() * 2).to(torch.long)]
    sign = (torch.signbit(q) & (q != 0)).to(torch.uint8) << 3
    codes = (sign | idx).flatten(-2)
    return codes, (e + SCALE_BIAS).to(torch.uint8)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> packed bytes [..., K/2] (even element in the low nibble)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of codes: {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """packed bytes [..., K/2] -> uint8 codes [..., K]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def quantize(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (packed uint8 [..., K/2], E8M0 scales uint8 [..., K/block])."""
    codes, scales = quantize_codes(x, block)
    return pack(codes), scales


def dequantize(
    packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
    block: int = BLOCK,
) -> torch.Tensor:
    """(packed [..., K/2], scales [..., K/block]) -> values [..., K] in ``dtype``.

    Exact in float32 (every E2M1 value times a power of two is representable)."""
    if torch.any(scales == 255):
        raise ValueError("E8M0 scale 255 (NaN) found in MXFP4 scales")
    codes = unpack(packed).to(torch.long)
    vals = e2m1_table(packed.device)[codes].unflatten(-1, (-1, block))
    if vals.shape[-2] != scales.shape[-1]:
        raise ValueError(
            f"MXFP4 shapes disagree: {packed.shape[-1] * 2} elements need "
            f"{packed.shape[-1] * 2 // block} scales per row, got {scales.shape[-1]}"
        )
    x = vals * torch.exp2(scales.float() - SCALE_BIAS).unsqueeze(-1)
    return x.flatten(-2).to(dtype)


def fake_quantize(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Quantize then dequantize (same dtype and shape): what MXFP4 does to a tensor."""
    e = block_exponents(x, block)
    e = e.float().unsqueeze(-1)
    q = round_to_e2m1(x.float().unflatten(-1, (-1, block)) * torch.exp2(-e)) * torch.exp2(e)
    return q.flatten(-2).to(x.dtype)
