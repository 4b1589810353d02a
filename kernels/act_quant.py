"""Activation quantization in one Triton kernel: x -> (optional 32x32 rotation) -> MXFP4.

Reference: kernels/reference.py (`quantize_activation_reference`, `fake_quantize_activation_reference`,
`fp8_reencode_activation_reference`). One program owns BM rows and walks K in chunks of NB
32-blocks held as an [NB, BM, 32] tile, so a block's rotation is one (batched) tensor-core
dot and its amax a reduction over the last axis. Three outputs, picked at compile time:

- MODE_MXFP4: packed codes [M, K/2] + E8M0 scales [M, K/32], bit-identical to mxfp4.quantize
  (the spec format; the sm100 dot_scaled GEMM reads it).
- MODE_DEQUANT: the fake-quantized activation in bf16 (every E2M1 value times a power of
  two is exact in bf16), for the exact W4A16-style GEMMs used at small M.
- MODE_FP8: the sm90 FP8 operand: each row re-encoded relative to its largest block
  exponent E (value * 2^(e - E + 6) is exact in e4m3 for e - E >= -14; lower blocks are
  flushed to 0) plus the int32 row exponent E. Needs the row max first, so K is walked
  twice (one program per BM rows); the second pass re-reads x mostly from L2. The other
  modes use a 2D grid (rows x chunks of NB blocks).

The rotation is computed in float32 through `tf32x3` (three tf32 products, ~fp32 accuracy);
the reference rotates with an fp32 matmul, so rotated inputs can differ from it in the
last ulp, which flips a code only when a value lands exactly on a rounding boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MODE_MXFP4 = 0
MODE_DEQUANT = 1
MODE_FP8 = 2


@triton.jit
def _rotate(x, r_ptr, offs_nb, offs_i, K_BLOCK0, R_BSTRIDE: tl.constexpr, BM: tl.constexpr,
            NB: tl.constexpr, HAS_R: tl.constexpr, ROT_PRECISION: tl.constexpr):
    """[NB, BM, 32] float32 -> x @ R per 32-block (R shared when R_BSTRIDE == 0)."""
    if HAS_R:
        if R_BSTRIDE == 0:
            r = tl.load(r_ptr + offs_i[:, None] * 32 + offs_i[None, :])
            y = tl.dot(tl.reshape(x, [NB * BM, 32]), r, input_precision=ROT_PRECISION)
            x = tl.reshape(y, [NB, BM, 32])
        else:
            rb = (K_BLOCK0 + offs_nb)[:, None, None] * R_BSTRIDE
            r = tl.load(r_ptr + rb + offs_i[None, :, None] * 32 + offs_i[None, None, :])
            x = tl.dot(x, r, input_precision=ROT_PRECISION)
    return x


@triton.jit
def _block_exponent(amax):
    """floor(log2 amax) - 2 clamped to [-127, 127] from the float32 bits (0 and subnormals -> -127)."""
    ebits = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.maximum(ebits - 129, -127)


@triton.jit
def _e2m1_index(mag):
    """|v|/X -> E2M1 magnitude index 0..7: round to nearest, ties to even, saturate at 6."""
    return ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
            + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
            + (mag > 5.0).to(tl.int32))


@triton.jit
def _pow2(e):
    """2^e as float32 for integer e in [-126, 127], built from bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_bits(code):
    """E2M1 code (sign<<3 | index) -> float32 bit pattern of its value (int32)."""
    mag = code & 7
    bits = tl.where(mag >= 2, (mag + 252) << 22, tl.where(mag == 1, 126 << 23, 0))
    return bits | ((code & 8) << 28)


@triton.jit
def _act_quant_kernel(x_ptr, r_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                      R_BSTRIDE: tl.constexpr, HAS_R: tl.constexpr, MODE: tl.constexpr,
                      BM: tl.constexpr, NB: tl.constexpr, ROT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BM + tl.arange(0, BM)
    if MODE == 2:  # the row exponent needs the whole row: one program walks all of K
        k_lo = 0
        k_hi = K
    else:  # blocks are independent: a 2D grid, one chunk of NB blocks per program
        k_lo = tl.program_id(1) * NB * 32
        k_hi = tl.minimum(K, k_lo + NB * 32)
    offs_nb = tl.arange(0, NB)
    offs_i = tl.arange(0, 32)
    row_ok = (offs_m < M)[None, :, None]
    x_rows = x_ptr + offs_m.to(tl.int64)[None, :, None] * stride_xm
    if MODE == 2:
        rowmax = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, NB * 32):
            cols = k0 + offs_nb[:, None, None] * 32 + offs_i[None, None, :]
            msk = row_ok & (cols < K)
            x = tl.load(x_rows + cols, mask=msk, other=0.0).to(tl.float32)
            y = _rotate(x, r_ptr, offs_nb, offs_i, k0 // 32, R_BSTRIDE, BM, NB, HAS_R, ROT_PRECISION)
            rowmax = tl.maximum(rowmax, tl.max(tl.max(tl.abs(y), axis=2), axis=0))
        erow = _block_exponent(rowmax)
        tl.store(s_ptr + offs_m, erow, mask=offs_m < M)
    for k0 in range(k_lo, k_hi, NB * 32):
        cols = k0 + offs_nb[:, None, None] * 32 + offs_i[None, None, :]
        msk = row_ok & (cols < K)
        x = tl.load(x_rows + cols, mask=msk, other=0.0).to(tl.float32)
        y = _rotate(x, r_ptr, offs_nb, offs_i, k0 // 32, R_BSTRIDE, BM, NB, HAS_R, ROT_PRECISION)
        e = _block_exponent(tl.max(tl.abs(y), axis=2))  # [NB, BM]
        a = y * _pow2(-e)[:, :, None]
        idx = _e2m1_index(tl.abs(a))
        code = idx | ((a < 0) & (idx > 0)).to(tl.int32) << 3
        if MODE == 0:
            lo, hi = tl.split(tl.reshape(code, [NB, BM, 16, 2]))
            packed = (lo | (hi << 4)).to(tl.uint8)
            pcols = k0 // 2 + offs_nb[:, None, None] * 16 + tl.arange(0, 16)[None, None, :]
            pmsk = row_ok & (pcols < K // 2)
            tl.store(q_ptr + offs_m.to(tl.int64)[None, :, None] * stride_qm + pcols, packed, mask=pmsk)
            scols = k0 // 32 + offs_nb[:, None]
            tl.store(s_ptr + offs_m[None, :] * stride_sm + scols, (e + 127).to(tl.uint8),
                     mask=(offs_m < M)[None, :] & (scols < K // 32))
        elif MODE == 1:
            v = e2m1_bits(code).to(tl.float32, bitcast=True) * 0.5
            v = v * _pow2(e + 1)[:, :, None]
            tl.store(q_ptr + offs_m.to(tl.int64)[None, :, None] * stride_qm + cols,
                     v.to(q_ptr.dtype.element_ty), mask=msk)
        else:
            d = e - erow[None, :]  # [NB, BM], <= 0
            v = e2m1_bits(code).to(tl.float32, bitcast=True)
            v = tl.where((d >= -14)[:, :, None], v * _pow2(tl.maximum(d, -14) + 6)[:, :, None], 0.0)
            tl.store(q_ptr + offs_m.to(tl.int64)[None, :, None] * stride_qm + cols,
                     v.to(tl.float8e4nv), mask=msk)


def _rotation_operand(input_rotation: torch.Tensor | None, K: int, device) -> tuple[torch.Tensor | None, int]:
    """(float32 contiguous R, stride between blocks: 0 for one shared [32, 32] block)."""
    if input_rotation is None:
        return None, 0
    r = input_rotation.to(device=device, dtype=torch.float32).contiguous()
    if r.dim() == 2 and r.shape == (32, 32):
        return r, 0
    if r.dim() == 3 and r.shape == (K // 32, 32, 32):
        return r, 32 * 32
    raise ValueError(f"fused rotation takes [32, 32] or [K/32, 32, 32], got {tuple(r.shape)}")


def fusable_rotation(input_rotation: torch.Tensor | None, K: int) -> bool:
    """Whether the kernel can fuse this rotation (32-blocks); others are applied beforehand."""
    if input_rotation is None:
        return True
    shape = tuple(input_rotation.shape)
    return shape == (32, 32) or shape == (K // 32, 32, 32)


def quantize_activation(x: torch.Tensor, input_rotation: torch.Tensor | None = None,
                        mode: int = MODE_MXFP4, block_m: int = 16, nb: int | None = None,
                        num_warps: int = 4, rot_precision: str = "tf32x3"):
    """x [M, K] (K % 32 == 0) -> per `mode`: (packed uint8 [M, K/2], scales uint8 [M, K/32]);
    fake-quantized x in x's dtype [M, K]; or (fp8 e4m3 [M, K], row exponents int32 [M])."""
    M, K = x.shape
    if K % 32:
        raise ValueError(f"activation quantization needs K % 32 == 0, got {K}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    r, r_bstride = _rotation_operand(input_rotation, K, x.device)
    if mode == MODE_MXFP4:
        q = torch.empty(M, K // 2, dtype=torch.uint8, device=x.device)
        s = torch.empty(M, K // 32, dtype=torch.uint8, device=x.device)
    elif mode == MODE_DEQUANT:
        q = torch.empty(M, K, dtype=x.dtype, device=x.device)
        s = q  # unused
    else:
        q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
        s = torch.empty(M, dtype=torch.int32, device=x.device)
    nb = nb or (8 if mode == MODE_FP8 else 4)
    grid = (triton.cdiv(M, block_m), 1 if mode == MODE_FP8 else triton.cdiv(K, nb * 32))
    _act_quant_kernel[grid](
        x, r if r is not None else x, q, s, M, K, x.stride(0), q.stride(0),
        s.stride(0) if s.dim() == 2 else 1,
        R_BSTRIDE=r_bstride, HAS_R=r is not None, MODE=mode, BM=block_m, NB=nb,
        ROT_PRECISION=rot_precision, num_warps=num_warps)
    return q if mode == MODE_DEQUANT else (q, s)
