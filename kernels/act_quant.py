"""Activation quantization in one Triton kernel: x -> (optional 32x32 rotation) -> MXFP4.

Reference: kernels/reference.py (`quantize_activation_reference`, `fake_quantize_activation_reference`,
`fp8_reencode_activation_reference`). One program owns BM rows and walks K in chunks of NB
32-blocks held as an [NB, BM, 32] tile, so a block's rotation is one (batched) tensor-core
dot and its amax a reduction over the last axis. Four outputs, picked at compile time:

- MODE_MXFP4: packed codes [M, K/2] + E8M0 scales [M, K/32], bit-identical to mxfp4.quantize
  (the spec format; the sm100 dot_scaled GEMM reads it).
- MODE_DEQUANT: the fake-quantized activation in bf16 (every E2M1 value times a power of
  two is exact in bf16), for the exact W4A16-style GEMMs used at small M.
- MODE_FP8: the sm90 FP8 operand: each row re-encoded relative to its largest block
  exponent E (value * 2^(e - E + 6) is exact in e4m3 for e - E >= -14; lower blocks are
  flushed to 0) plus the int32 row exponent E. Needs the row max first, so K is walked
  twice (one program per BM rows); the second pass re-reads x mostly from L2. The other
  modes use a 2D grid (rows x chunks of NB blocks).
- MODE_PAIRS: the decode gemv's operand (gemm.gemv_a4): E2M1 * 2 as float16 [M, K] (exact)
  with the 32 elements of each block in the order of the gemv's fp16x2 weight pairs
  (`pairs_order`), + E8M0 scales [M, K/32] as in MODE_MXFP4.

SILU (the one-pass FP8 row kernel and the 2D kernel): x is computed in the loads as
`silu_mul(gate, up)` of vLLM's gate_up rows [M, 2K], so down_proj's input is never written in
bf16 (`quantize_activation(silu=True)`; vllm_brq/fusion.py puts it in the compiled graph).

The rotation is computed in float32 through `tf32x3` (three tf32 products, ~fp32 accuracy);
the reference rotates with an fp32 matmul, so rotated inputs can differ from it in the
last ulp, which flips a code only when a value lands exactly on a rounding boundary.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

MODE_MXFP4 = 0
MODE_DEQUANT = 1
MODE_FP8 = 2
MODE_PAIRS = 3


@triton.jit
def _rotate(x, r_ptr, offs_nb, offs_i, K_BLOCK0, R_BSTRIDE: tl.constexpr, BM: tl.constexpr,
            NB: tl.constexpr, HAS_R: tl.constexpr, ROT_PRECISION: tl.constexpr,
            SIGN: tl.constexpr = False, rs_ptr=None):
    """[NB, BM, 32] (x's dtype) -> float32 x @ R per 32-block (R shared when R_BSTRIDE == 0).

    SIGN: every entry of R has the magnitude c = |R[0, 0]|; rs_ptr holds R / c (exactly +-1)
    in x's dtype, so x @ (R/c) is one 16-bit tensor-core dot with float32 accumulation
    (each product exact), then * c in float32. Otherwise R is float32 and the dot runs in
    ROT_PRECISION (tf32x3 ~ float32)."""
    if HAS_R:
        if SIGN:
            c = tl.abs(tl.load(r_ptr).to(tl.float32))
            if R_BSTRIDE == 0:
                r = tl.load(rs_ptr + offs_i[:, None] * 32 + offs_i[None, :])
                y = tl.dot(tl.reshape(x.to(r.dtype), [NB * BM, 32]), r, out_dtype=tl.float32,
                           input_precision=ROT_PRECISION)
                x = tl.reshape(y, [NB, BM, 32]) * c
            else:
                rb = (K_BLOCK0 + offs_nb)[:, None, None] * R_BSTRIDE
                r = tl.load(rs_ptr + rb + offs_i[None, :, None] * 32 + offs_i[None, None, :])
                x = tl.dot(x.to(r.dtype), r, out_dtype=tl.float32, input_precision=ROT_PRECISION) * c
        else:
            x = x.to(tl.float32)
            if R_BSTRIDE == 0:
                r = tl.load(r_ptr + offs_i[:, None] * 32 + offs_i[None, :])
                y = tl.dot(tl.reshape(x, [NB * BM, 32]), r, input_precision=ROT_PRECISION)
                x = tl.reshape(y, [NB, BM, 32])
            else:
                rb = (K_BLOCK0 + offs_nb)[:, None, None] * R_BSTRIDE
                r = tl.load(r_ptr + rb + offs_i[None, :, None] * 32 + offs_i[None, None, :])
                x = tl.dot(x, r, input_precision=ROT_PRECISION)
    return x.to(tl.float32)


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
def pairs_order(i):
    """MODE_PAIRS: position of block element i (0..31). The gemv reads a 32-block's weights
    as 4 int32 words of 8 nibbles and decodes word w into 4 fp16x2 registers, register k
    holding elements (8w + k, 8w + k + 4) (the cheapest shifts); the activation is stored in
    that order: fp16 slot 2 (4w + k) + lane."""
    r = i % 8
    return ((i // 8) * 4 + r % 4) * 2 + r // 4


@triton.jit
def _fp8_values(code, d):
    """E2M1 code, block exponent minus row exponent d (<= 0, per block, broadcastable to code)
    -> float32 E2M1 * 2^(d + 6), 0 for d < -14 (flushed); exact in e4m3."""
    v = e2m1_bits(code).to(tl.float32, bitcast=True)
    return tl.where(d >= -14, v * _pow2(tl.maximum(d, -14) + 6), 0.0)


@triton.jit
def _row_scale(erow):
    """2^(erow - 6) in float32 (subnormal below 2^-126, exact), for the FP8 GEMM's scale_a."""
    e = erow - 6
    return tl.where(e >= -126, _pow2(tl.maximum(e, -126)), _pow2(tl.maximum(e, -126) + 64) * (2.0 ** -64))


@triton.jit
def _block_codes(y):
    """Rotated float32 y [NB, BM, 32] -> (block exponents e [NB, BM], E2M1 codes [NB, BM, 32])."""
    e = _block_exponent(tl.max(tl.abs(y), axis=2))
    a = y * _pow2(-e)[:, :, None]
    idx = _e2m1_index(tl.abs(a))
    return e, idx | ((a < 0) & (idx > 0)).to(tl.int32) << 3


@triton.jit
def _store_scales(s_ptr, e, offs_m, k0, M, K, stride_sm, NB: tl.constexpr):
    """E8M0 scales of the NB blocks from column k0 of rows offs_m."""
    scols = k0 // 32 + tl.arange(0, NB)[:, None]
    tl.store(s_ptr + offs_m[None, :] * stride_sm + scols, (e + 127).to(tl.uint8),
             mask=(offs_m < M)[None, :] & (scols < K // 32))


@triton.jit
def store_pairs(q_ptr, s_ptr, e, code, offs_m, k0, M, K, stride_qm, stride_sm, NB: tl.constexpr):
    """MODE_PAIRS output of the NB blocks from column k0 of rows offs_m (codes [NB, BM, 32])."""
    offs_i = tl.arange(0, 32)
    cols = k0 + tl.arange(0, NB)[:, None, None] * 32
    msk = (offs_m < M)[None, :, None] & (cols + offs_i[None, None, :] < K)
    v = (e2m1_bits(code).to(tl.float32, bitcast=True) * 2.0).to(tl.float16)
    tl.store(q_ptr + offs_m.to(tl.int64)[None, :, None] * stride_qm + cols + pairs_order(offs_i)[None, None, :], v,
             mask=msk)
    _store_scales(s_ptr, e, offs_m, k0, M, K, stride_sm, NB)


@triton.jit
def _act_quant_kernel(x_ptr, r_ptr, rs_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                      R_BSTRIDE: tl.constexpr, HAS_R: tl.constexpr, MODE: tl.constexpr,
                      BM: tl.constexpr, NB: tl.constexpr, ROT_PRECISION: tl.constexpr, SIGN: tl.constexpr,
                      LAUNCH_DEPENDENTS: tl.constexpr, WAIT_PRIMARY: tl.constexpr = False, SILU: tl.constexpr = False):
    if LAUNCH_DEPENDENTS:  # a PDL-launched GEMV after this may start streaming its weights now
        gdc_launch_dependents()
    if WAIT_PRIMARY:  # launched as a programmatic dependent: x is complete only after the wait
        gdc_wait()
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
            x = _load_x(x_rows + cols, msk, K, SILU)
            y = _rotate(x, r_ptr, offs_nb, offs_i, k0 // 32, R_BSTRIDE, BM, NB, HAS_R, ROT_PRECISION, SIGN, rs_ptr)
            rowmax = tl.maximum(rowmax, tl.max(tl.max(tl.abs(y), axis=2), axis=0))
        erow = _block_exponent(rowmax)
        tl.store(s_ptr + offs_m, erow, mask=offs_m < M)
    for k0 in range(k_lo, k_hi, NB * 32):
        cols = k0 + offs_nb[:, None, None] * 32 + offs_i[None, None, :]
        msk = row_ok & (cols < K)
        x = _load_x(x_rows + cols, msk, K, SILU)
        y = _rotate(x, r_ptr, offs_nb, offs_i, k0 // 32, R_BSTRIDE, BM, NB, HAS_R, ROT_PRECISION, SIGN, rs_ptr)
        e, code = _block_codes(y)
        if MODE == 0:
            lo, hi = tl.split(tl.reshape(code, [NB, BM, 16, 2]))
            packed = (lo | (hi << 4)).to(tl.uint8)
            pcols = k0 // 2 + offs_nb[:, None, None] * 16 + tl.arange(0, 16)[None, None, :]
            pmsk = row_ok & (pcols < K // 2)
            tl.store(q_ptr + offs_m.to(tl.int64)[None, :, None] * stride_qm + pcols, packed, mask=pmsk)
            _store_scales(s_ptr, e, offs_m, k0, M, K, stride_sm, NB)
        elif MODE == 3:
            store_pairs(q_ptr, s_ptr, e, code, offs_m, k0, M, K, stride_qm, stride_sm, NB)
        elif MODE == 1:
            v = e2m1_bits(code).to(tl.float32, bitcast=True) * 0.5
            v = v * _pow2(e + 1)[:, :, None]
            tl.store(q_ptr + offs_m.to(tl.int64)[None, :, None] * stride_qm + cols,
                     v.to(q_ptr.dtype.element_ty), mask=msk)
        else:
            v = _fp8_values(code, (e - erow[None, :])[:, :, None])
            tl.store(q_ptr + offs_m.to(tl.int64)[None, :, None] * stride_qm + cols,
                     v.to(tl.float8e4nv), mask=msk)


@triton.jit
def _fwht32(x, rs_ptr, NB: tl.constexpr, BM: tl.constexpr, PLAIN: tl.constexpr = False):
    """x [NB, BM, 32] -> float32 x @ (R/c) per block for R/c = diag(s_in) H32 (Sylvester; s_in =
    column 0 of R/c at rs_ptr): a fast Walsh-Hadamard transform, 5 butterfly stages of adds in
    registers instead of the tensor-core dot (whose operands go through shared memory), for
    tiles that hold each block in one thread (`_load_rows` BLOCKS). A stage butterflies index
    bit 4 and puts the result bit at bit 0 (the others move up), so after 5 the bits are back
    in place, y_j = sum_i s_i x_i (-1)^popcount(i & j), and, as each join makes its bit the
    first register, the registers are in index order (fp8 packs and stores without shuffles).
    Numerics as the +-1 dot: every partial sum is a signed sum of bf16 values (8 significant
    bits), exact in float32 while a block's nonzero values span < 2^12; beyond that both round
    near the last ulp, like the reference's fp32 matmul, which flips a code only on a boundary.
    PLAIN (s_in = 1, Rotation.plain): no sign pass (32 scalar loads and a multiply per value)."""
    if PLAIN:
        y = x.to(tl.float32)
    else:
        y = x.to(tl.float32) * tl.load(rs_ptr + tl.arange(0, 32) * 32).to(tl.float32)[None, None, :]
    for _ in tl.static_range(5):
        a, b = tl.split(tl.permute(tl.reshape(y, [NB, BM, 2, 16]), (0, 1, 3, 2)))
        y = tl.reshape(tl.join(a + b, a - b), [NB, BM, 32])
    return y


# mma.m16n8k16 (bf16/fp16 in, float32 accumulate) for `_hadamard32_mma`: A = x, a lane's 8
# loaded elements as its 4 A registers ($8..$11, in load order), B = H16 ($12..$15, two
# n-tiles), then the H2 butterfly of the two half-block rows; $0..$7 the outputs in memory order.
_H32_MMA = """
{
.reg .f32 z, c0, c1, c2, c3, d0, d1, d2, d3;
mov.f32 z, 0f00000000;
mma.sync.aligned.m16n8k16.row.col.f32.TY.TY.f32 {c0, c1, c2, c3}, {$8, $9, $10, $11}, {$12, $13}, {z, z, z, z};
mma.sync.aligned.m16n8k16.row.col.f32.TY.TY.f32 {d0, d1, d2, d3}, {$8, $9, $10, $11}, {$14, $15}, {z, z, z, z};
add.f32 $0, c0, c2; add.f32 $1, c1, c3; sub.f32 $2, c0, c2; sub.f32 $3, c1, c3;
add.f32 $4, d0, d2; add.f32 $5, d1, d3; sub.f32 $6, d0, d2; sub.f32 $7, d1, d3;
}
"""
H32_MMA_BF16 = tl.constexpr(_H32_MMA.replace("TY", "bf16"))
H32_MMA_F16 = tl.constexpr(_H32_MMA.replace("TY", "f16"))
H32_MMA_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 8))


@triton.jit
def _h16_fragments(DTYPE: tl.constexpr):
    """[32, 8]: what lane l, (g, q) = (l // 4, l % 4), holds of mma.m16n8k16's B operand
    H16[k][j] = (-1)^popcount(k & j) for the two n-tiles t: element 4t + 2h + i is
    H16[2q + i + 8h][8t + g] (PTX ISA fragment layout)."""
    lane = tl.arange(0, 32)[:, None]
    c = tl.arange(0, 8)[None, :]
    p = (2 * (lane % 4) + c % 2 + 8 * ((c // 2) % 2)) & (8 * (c // 4) + lane // 4)
    return tl.where(((p ^ (p >> 1) ^ (p >> 2) ^ (p >> 3)) & 1) == 1, -1.0, 1.0).to(DTYPE)


@triton.jit
def _hadamard32_mma(x, NU: tl.constexpr, MMA: tl.constexpr):
    """x [NU, 8]: a row's 32-blocks in memory order as units of 8 contiguous elements (unit u =
    block u // 4, quarter u % 4) -> float32 x @ H32 per block, in the same positions. A thread
    holds whole units and lane l holds units u = l (mod 32): lane (g, q) = (l // 4, l % 4) has
    quarter q of block g of a group of 8 blocks. H32 = H2 (x) H16 on index bit 1: a block is two
    rows of 16 (bit 1 = 0 / 1) for one tensor-core mma with H16, whose k and n indices are the
    other four bits in the order the fragments hold them (k = bits 0, 3, 4, 2 of the element:
    relabeling index bits on both sides leaves a Sylvester Hadamard unchanged); then one add
    and one subtract per output. A lane's 8 loaded elements are exactly its A registers and its
    8 outputs are again the 8 elements of its unit: no shuffle, no shared memory; per element
    0.25 mma + 1 add against the FWHT's 5 adds. Sums are exact in float32 under the same
    condition as `_fwht32`'s (beyond it both round near the last ulp). Relies on Triton's layout
    for [NU, 8] loads (8 per thread, 32 consecutive units per warp; tests/test_kernels_compile_sm90.py
    checks it). MMA = False (the interpreter): the same transform by `_fwht32`."""
    if MMA:
        b = tl.broadcast_to(tl.reshape(_h16_fragments(x.dtype), [1, 32, 8]), [NU // 32, 32, 8])
        b = tl.reshape(b, [NU, 8])
        if x.dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(H32_MMA_BF16, H32_MMA_CONSTRAINTS, [x, b], dtype=tl.float32,
                                             is_pure=True, pack=8)
        return tl.inline_asm_elementwise(H32_MMA_F16, H32_MMA_CONSTRAINTS, [x, b], dtype=tl.float32, is_pure=True,
                                         pack=8)
    return tl.reshape(_fwht32(tl.reshape(x, [NU // 4, 1, 32]), x, NU // 4, 1, PLAIN=True), [NU, 8])


@triton.jit
def _act_quant_fp8_mma_kernel(x_ptr, r_ptr, q_ptr, e_ptr, sc_ptr, K, stride_xm, stride_qm, NU: tl.constexpr,
                              ROUND: tl.constexpr, MMA: tl.constexpr, SILU: tl.constexpr = False):
    """MODE_FP8 in one pass with the plain Hadamard R4 (Rotation.plain) on tensor cores
    (`_hadamard32_mma`): one program per row, held as NU units of 8 elements (16-byte loads,
    8-byte stores, contiguous per warp); a block's amax is a reduction over its 4 lanes. Same
    bytes as `_act_quant_fp8_row_kernel` with HAD and PLAIN. SILU: x is silu_mul of the gate_up
    row at x_ptr."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, NU)[:, None] * 8 + tl.arange(0, 8)[None, :]
    msk = offs < K
    fp8_mma_row(_load_x(x_ptr + row * stride_xm + offs, msk, K, SILU), r_ptr, q_ptr, e_ptr, sc_ptr, row, offs, msk,
                stride_qm, NU, ROUND, MMA)


@triton.jit
def fp8_mma_row(x, r_ptr, q_ptr, e_ptr, sc_ptr, row, offs, msk, stride_qm, NU: tl.constexpr, ROUND: tl.constexpr,
                MMA: tl.constexpr):
    """One row x [NU, 8] (16-bit, offs/msk its columns) -> x H/c per 32-block on tensor cores -> the
    FP8 operand, row exponent and row scale (also the norm-fused R1 kernel's tail, norm_quant.py)."""
    y = _hadamard32_mma(x, NU, MMA)
    c = tl.abs(tl.load(r_ptr).to(tl.float32))
    e = _block_exponent(tl.max(tl.max(tl.reshape(tl.abs(y), [NU // 4, 4, 8]), axis=2), axis=1) * c)  # padding -127
    erow = tl.max(e, axis=0)
    yb = tl.reshape(y, [NU // 4, 4, 8])
    v = tl.reshape(_fp8_from_rotated(yb, e[:, None, None], (e - erow)[:, None, None], ROUND, c), [NU, 8])
    tl.store(q_ptr + row * stride_qm + offs, v.to(tl.float8e4nv), mask=msk)
    tl.store(e_ptr + row, erow)
    tl.store(sc_ptr + row, _row_scale(erow))


@triton.jit
def silu_mul(g, u):
    """vLLM's SiluAndMul as eager torch computes it in 16 bits: silu(g) in float32 rounded to g's
    dtype, times u, rounded (kernels/reference.py silu_mul_reference)."""
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    return (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype)


@triton.jit
def _load_x(p, msk, K, SILU: tl.constexpr):
    """x at p; SILU: p points into gate_up rows [gate | up] of 2K, x = silu_mul(gate, up)."""
    x = tl.load(p, mask=msk, other=0.0)
    if SILU:
        x = silu_mul(x, tl.load(p + K, mask=msk, other=0.0))
    return x


@triton.jit
def _load_rows(rows, row_ok, K, NB: tl.constexpr, BM: tl.constexpr, BLOCKS: tl.constexpr, SILU: tl.constexpr = False):
    """x [NB, BM, 32] of the rows at `rows` ([1, BM, 1] pointers), 0 past K and where not row_ok.
    BLOCKS: each 32-block whole in one thread (four 16-byte loads whose lanes walk the blocks,
    joined in registers), so `_fwht32` and the block amax never leave the thread.
    SILU: x = silu_mul(gate, up) of gate_up rows (`_load_x`)."""
    if BLOCKS:
        p = rows + tl.arange(0, NB)[:, None, None] * 32 + tl.arange(0, 8)[None, None, :]
        ok = row_ok & (tl.arange(0, NB) * 32 < K)[:, None, None]
        x = tl.join(tl.join(_load_x(p, ok, K, SILU), _load_x(p + 8, ok, K, SILU)),
                    tl.join(_load_x(p + 16, ok, K, SILU), _load_x(p + 24, ok, K, SILU)))
        x = tl.reshape(tl.permute(x, (0, 1, 4, 3, 2)), [NB, BM, 32])  # [.., k, a|b, ab|cd] -> 16 ab|cd + 8 a|b + k
    else:
        cols = tl.arange(0, NB)[:, None, None] * 32 + tl.arange(0, 32)[None, None, :]
        x = _load_x(rows + cols, row_ok & (cols < K), K, SILU)
    return x


@triton.jit
def _store_rows(rows, v, row_ok, K, NB: tl.constexpr, BM: tl.constexpr, BLOCKS: tl.constexpr):
    """Stores v [NB, BM, 32] as `_load_rows` loads; BLOCKS: two 16-element stores per block from
    the thread that holds it (no layout conversion)."""
    if BLOCKS:
        lo, hi = tl.split(tl.permute(tl.reshape(v, [NB, BM, 2, 16]), (0, 1, 3, 2)))
        p = rows + tl.arange(0, NB)[:, None, None] * 32 + tl.arange(0, 16)[None, None, :]
        ok = row_ok & (tl.arange(0, NB) * 32 < K)[:, None, None]
        tl.store(p, lo, mask=ok)
        tl.store(p + 16, hi, mask=ok)
    else:
        cols = tl.arange(0, NB)[:, None, None] * 32 + tl.arange(0, 32)[None, None, :]
        tl.store(rows + cols, v, mask=row_ok & (cols < K))


@triton.jit
def _act_quant_fp8_row_kernel(x_ptr, r_ptr, rs_ptr, q_ptr, e_ptr, sc_ptr, M, K, stride_xm, stride_qm,
                              HAS_R: tl.constexpr, SIGN: tl.constexpr, BM: tl.constexpr, NBP: tl.constexpr,
                              ROT_PRECISION: tl.constexpr, ROUND: tl.constexpr = "fast", HAD: tl.constexpr = False,
                              PLAIN: tl.constexpr = False, SILU: tl.constexpr = False):
    """MODE_FP8 in one pass: a program holds BM whole rows ([NBP >= K/32 blocks, BM, 32] in
    registers), so x is read once: row max exponent, codes and the e4m3 operand from the same
    registers. Writes the int32 row exponent and the float32 row scale 2^(E - 6).
    HAD (Rotation.hadamard): rotate by `_fwht32` on a block-per-thread tile. SILU: x is
    silu_mul of the gate_up rows at x_ptr."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    x = _load_rows(x_ptr + offs_m.to(tl.int64)[None, :, None] * stride_xm, (offs_m < M)[None, :, None], K,
                   NBP, BM, HAD, SILU)
    _fp8_row_tile(x, r_ptr, rs_ptr, q_ptr, e_ptr, sc_ptr, offs_m, M, K, stride_qm,
                  HAS_R, SIGN, BM, NBP, ROT_PRECISION, ROUND, HAD, PLAIN)


@triton.jit
def _fp8_from_rotated(y, e, d, ROUND: tl.constexpr, c=1.0):
    """Rotated x / c (y), its block exponents e and block minus row exponents d (both per block,
    expanded to y's rank: [NB, BM, 1] for y [NB, BM, 32]) -> float32 E2M1 * 2^(d + 6), 0 for
    d < -14 (exact in e4m3; fp8_reencode_reference).
    c * 2^-e is exact, so y * (c * 2^-e) = (y * c) * 2^-e: one rounding, as the dot's * c.
    Three roundings of a = y / 2^e to the E2M1 grid (nearest, ties to even, saturate at 6),
    the same values and signs (no -0) each:
    - "compare" (round 1): the 7-compare index, then the value from the code (~30 operations);
    - "fast" (round 3): by the grid spacing (0.5 below 2, 1 below 4, else 2) with the float32
      round-to-nearest-even magic add, clamp to +-6, add +0.0 (~17);
    - "bits" (round 6): no selects (the predicates spill to bit masks on sm90): |a| clamped
      to <= 1.5 rounds by the magic add at spacing 0.5, clamped to >= 1.5 rounds to one mantissa
      bit on the float32 bits (add 2^21 - 1 + the kept bit, mask); their sum - 1.5 is the
      magnitude, the sign goes back by a bit-or; scale, flush and the -0 fix are one FMA by a
      per-block multiplier that is 0 for flushed blocks (~13)."""
    a = y * (c * _pow2(-e))
    if ROUND == "bits":
        m = tl.abs(a)  # below 1.5: spacing 0.5 by the magic add; from 1.5 up: one mantissa bit
        lo = (tl.minimum(m, 1.5) + 6291456.0) - 6291457.5  # 1.5 * 2^22 (spacing 0.5), minus 1.5
        hb = tl.maximum(m, 1.5).to(tl.int32, bitcast=True)
        hi = ((hb + 0x1FFFFF + ((hb >> 22) & 1)) & -4194304).to(tl.float32, bitcast=True)  # 0xFFC00000
        r = tl.minimum(lo + hi, 6.0).to(tl.int32, bitcast=True) | (a.to(tl.int32, bitcast=True) & -2147483648)
        mult = tl.where(d >= -14, _pow2(tl.maximum(d, -14) + 6), 0.0)  # 0: the flushed blocks
        return r.to(tl.float32, bitcast=True) * mult + 0.0  # + 0.0: -0 -> +0
    if ROUND == "fast":
        m = tl.abs(a)
        inv = tl.where(m < 2.0, 2.0, tl.where(m < 4.0, 1.0, 0.5))
        sp = tl.where(m < 2.0, 0.5, tl.where(m < 4.0, 1.0, 2.0))
        t = (a * inv + 12582912.0) - 12582912.0  # rint, |a * inv| < 16
        r = tl.minimum(tl.maximum(t * sp, -6.0), 6.0) + 0.0
        return tl.where(d >= -14, r * _pow2(tl.maximum(d, -14) + 6), 0.0)
    idx = _e2m1_index(tl.abs(a))
    code = idx | ((a < 0) & (idx > 0)).to(tl.int32) << 3
    return _fp8_values(code, d)


@triton.jit
def _fp8_row_tile(x, r_ptr, rs_ptr, q_ptr, e_ptr, sc_ptr, offs_m, M, K, stride_qm,
                  HAS_R: tl.constexpr, SIGN: tl.constexpr, BM: tl.constexpr, NBP: tl.constexpr,
                  ROT_PRECISION: tl.constexpr, ROUND: tl.constexpr, HAD: tl.constexpr = False,
                  PLAIN: tl.constexpr = False):
    """The one-pass FP8 math on whole rows x [NBP, BM, 32] (shared by the row kernels).
    HAD: y = x @ (R/c) by `_fwht32`; c is folded into the block scale (amax(|y|) * c rounds
    like max |y * c|, monotone), saving the per-element * c."""
    if HAD:
        y = _fwht32(x, rs_ptr, NBP, BM, PLAIN)
        c = tl.abs(tl.load(r_ptr).to(tl.float32))
    else:
        y = _rotate(x, r_ptr, tl.arange(0, NBP), tl.arange(0, 32), 0, 0, BM, NBP, HAS_R, ROT_PRECISION, SIGN,
                    rs_ptr)
        c = 1.0
    e = _block_exponent(tl.max(tl.abs(y), axis=2) * c)  # [NBP, BM]
    erow = tl.max(e, axis=0)  # [BM]
    v = _fp8_from_rotated(y, e[:, :, None], (e - erow[None, :])[:, :, None], ROUND, c)
    _store_rows(q_ptr + offs_m.to(tl.int64)[None, :, None] * stride_qm, v.to(tl.float8e4nv),
                (offs_m < M)[None, :, None], K, NBP, BM, HAD)
    tl.store(e_ptr + offs_m, erow, mask=offs_m < M)
    tl.store(sc_ptr + offs_m, _row_scale(erow), mask=offs_m < M)


@triton.jit
def _act_quant_fp8_persist_kernel(x_ptr, r_ptr, rs_ptr, q_ptr, e_ptr, sc_ptr, M, K, stride_xm, stride_qm,
                                  HAS_R: tl.constexpr, SIGN: tl.constexpr, BM: tl.constexpr, NBP: tl.constexpr,
                                  ROT_PRECISION: tl.constexpr, ROUND: tl.constexpr = "fast",
                                  HAD: tl.constexpr = False, PLAIN: tl.constexpr = False):
    """Round 3: the one-pass FP8 kernel made persistent (grid = a few programs per SM), with the
    next row tile's load issued before this tile's math (register double buffering), so
    HBM reads overlap the quantization instead of alternating with it."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(M, BM)
    offs_r = tl.arange(0, BM)
    offs_m = pid * BM + offs_r
    x = _load_rows(x_ptr + offs_m.to(tl.int64)[None, :, None] * stride_xm, (offs_m < M)[None, :, None], K,
                   NBP, BM, HAD)
    for t in range(pid, n_tiles, nprog):
        offs_m = t * BM + offs_r
        offs_n = offs_m + nprog * BM
        x_next = _load_rows(x_ptr + offs_n.to(tl.int64)[None, :, None] * stride_xm, (offs_n < M)[None, :, None],
                            K, NBP, BM, HAD)
        _fp8_row_tile(x, r_ptr, rs_ptr, q_ptr, e_ptr, sc_ptr, offs_m, M, K, stride_qm,
                      HAS_R, SIGN, BM, NBP, ROT_PRECISION, ROUND, HAD, PLAIN)
        x = x_next


@triton.jit
def _fp8_chunk_max_kernel(x_ptr, r_ptr, rs_ptr, pm_ptr, M, K, stride_xm, N_CHUNKS,
                          R_BSTRIDE: tl.constexpr, HAS_R: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr,
                          ROT_PRECISION: tl.constexpr, SIGN: tl.constexpr):
    """Two-phase FP8, phase 1 (2D grid, read-only): the largest block exponent of each
    [BM rows, NB blocks] chunk after the rotation -> pm [M, N_CHUNKS] int32."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    pc = tl.program_id(1)
    k0 = pc * NB * 32
    offs_nb = tl.arange(0, NB)
    offs_i = tl.arange(0, 32)
    cols = k0 + offs_nb[:, None, None] * 32 + offs_i[None, None, :]
    msk = (offs_m < M)[None, :, None] & (cols < K)
    x = tl.load(x_ptr + offs_m.to(tl.int64)[None, :, None] * stride_xm + cols, mask=msk, other=0.0)
    y = _rotate(x, r_ptr, offs_nb, offs_i, k0 // 32, R_BSTRIDE, BM, NB, HAS_R, ROT_PRECISION, SIGN, rs_ptr)
    e = _block_exponent(tl.max(tl.abs(y), axis=2))  # [NB, BM]; padded blocks give -127
    tl.store(pm_ptr + offs_m * N_CHUNKS + pc, tl.max(e, axis=0), mask=offs_m < M)


@triton.jit
def _fp8_apply_kernel(x_ptr, r_ptr, rs_ptr, pm_ptr, q_ptr, e_ptr, sc_ptr, M, K, stride_xm, stride_qm, N_CHUNKS,
                      R_BSTRIDE: tl.constexpr, HAS_R: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr,
                      NCP: tl.constexpr, ROT_PRECISION: tl.constexpr, SIGN: tl.constexpr,
                      ROUND: tl.constexpr = "fast"):
    """Two-phase FP8, phase 2 (2D grid): row exponent = max of the row's chunk maxima, then the
    chunk is re-read (and re-rotated) and written as e4m3; chunk 0 writes E and 2^(E - 6)."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    pc = tl.program_id(1)
    row_in = offs_m < M
    offs_c = tl.arange(0, NCP)
    pm = tl.load(pm_ptr + offs_m[:, None] * N_CHUNKS + offs_c[None, :],
                 mask=row_in[:, None] & (offs_c < N_CHUNKS)[None, :], other=-127)
    erow = tl.max(pm, axis=1)  # [BM]
    k0 = pc * NB * 32
    offs_nb = tl.arange(0, NB)
    offs_i = tl.arange(0, 32)
    cols = k0 + offs_nb[:, None, None] * 32 + offs_i[None, None, :]
    msk = row_in[None, :, None] & (cols < K)
    x = tl.load(x_ptr + offs_m.to(tl.int64)[None, :, None] * stride_xm + cols, mask=msk, other=0.0)
    y = _rotate(x, r_ptr, offs_nb, offs_i, k0 // 32, R_BSTRIDE, BM, NB, HAS_R, ROT_PRECISION, SIGN, rs_ptr)
    e = _block_exponent(tl.max(tl.abs(y), axis=2))
    v = _fp8_from_rotated(y, e[:, :, None], (e - erow[None, :])[:, :, None], ROUND)
    tl.store(q_ptr + offs_m.to(tl.int64)[None, :, None] * stride_qm + cols, v.to(tl.float8e4nv), mask=msk)
    if pc == 0:
        tl.store(e_ptr + offs_m, erow, mask=row_in)
        tl.store(sc_ptr + offs_m, _row_scale(erow), mask=row_in)


class Rotation:
    """A rotation prepared once for the kernels (no device sync at call time).

    `r` is the float32 R ([32, 32] shared or [K/32, 32, 32]); `sign`, when every entry of R
    has one magnitude c (randomized Hadamard: c = 2^-2.5), is R/c (+-1) in bf16/fp16 and
    the kernels rotate with one 16-bit tensor-core dot, then * c (c is read from r)."""

    def __init__(self, r: torch.Tensor, sign: torch.Tensor | None = None):
        self.r = r
        self.sign = sign

    @property
    def hadamard(self) -> bool:
        """R/c = diag(s_in) H32 (Sylvester; rotation.block_rotation's shared R): the one-pass FP8
        kernels rotate by an in-register FWHT (`_fwht32`) instead of the dot. prepare() marks it
        by a leading unit dim on `sign` ([1, 32, 32], same data): a shape is host metadata, so a
        Rotation rebuilt from a stored sign (dispatch.prepare_extras -> _rotation) keeps the
        mark without a device sync. Rotation(r, sign[0]) forces the dot (benchmarks)."""
        return self.sign is not None and self.sign.dim() in (self.r.dim() + 1, self.r.dim() + 2)

    @property
    def plain(self) -> bool:
        """R/c = H32 itself (s_in = 1: brq-convert folds R4's random signs into up_proj), so the
        FWHT skips its sign pass. prepare() marks it by two leading unit dims on `sign`."""
        return self.sign is not None and self.sign.dim() == self.r.dim() + 2

    @staticmethod
    def prepare(input_rotation: torch.Tensor, dtype=torch.bfloat16, allow_sign: bool = True) -> "Rotation":
        """Checks the entries (a device sync: call at load time, not under graph capture)."""
        r = input_rotation.to(dtype=torch.float32).contiguous()
        sign = None
        if allow_sign and r.numel():
            c = r.reshape(-1)[0].abs()
            if c > 0 and bool(torch.all(r.abs() == c)):
                sign = (r / c).to(dtype).contiguous()
                if r.shape == (32, 32) and bool(torch.equal(sign, sign[:, :1] * _sylvester(32, sign))):
                    sign = sign.unsqueeze(0)  # the `hadamard` mark (H32 diag(s_out), s_out != 1: the dot)
                    if bool(torch.all(sign[0, :, 0] == 1)):
                        sign = sign.unsqueeze(0)  # the `plain` mark
        return Rotation(r, sign)


def _sylvester(n: int, like: torch.Tensor) -> torch.Tensor:
    """The +-1 Sylvester Hadamard matrix H_n (H_2n = [[H, H], [H, -H]]) in like's dtype/device."""
    h = torch.ones(1, 1, dtype=like.dtype, device=like.device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _pdl_launch(pdl: bool) -> dict:
    """Launch options of a kernel that waits for the one before it (WAIT_PRIMARY)."""
    return dict(WAIT_PRIMARY=True, launch_pdl=True) if pdl else {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _rotation_operand(input_rotation, K: int, device, x_dtype):
    """(float32 R, +-1 R/c in the dot dtype or None, stride between blocks: 0 when shared)."""
    if input_rotation is None:
        return None, None, 0
    if isinstance(input_rotation, Rotation):
        r, sign = input_rotation.r, input_rotation.sign
        if r.device != device:
            r = r.to(device)
            sign = sign.to(device) if sign is not None else None
    else:
        r, sign = input_rotation.to(device=device, dtype=torch.float32).contiguous(), None
    if sign is not None:
        # the interpreter's 16-bit dot is not faithful (triton 3.9): float32 there, exact too
        want = torch.float32 if _interpreting() else x_dtype
        if sign.dtype != want:
            sign = sign.to(want)
    if r.dim() == 2 and r.shape == (32, 32):
        return r, sign, 0
    if r.dim() == 3 and r.shape == (K // 32, 32, 32):
        return r, sign, 32 * 32
    raise ValueError(f"fused rotation takes [32, 32] or [K/32, 32, 32], got {tuple(r.shape)}")


def fusable_rotation(input_rotation, K: int) -> bool:
    """Whether the kernel can fuse this rotation (32-blocks); others are applied beforehand."""
    if input_rotation is None:
        return True
    if isinstance(input_rotation, Rotation):
        input_rotation = input_rotation.r
    shape = tuple(input_rotation.shape)
    return shape == (32, 32) or shape == (K // 32, 32, 32)


ROW_KERNEL_MAX_K = 16384  # MODE_FP8 one-pass (whole rows in registers) up to this K
# persistent one-pass kernel, per padded row length NBP: (rows per tile, warps, programs per SM)
PERSIST_CFG = {128: (2, 4, 2), 512: (1, 8, 2)}


@functools.lru_cache(maxsize=None)
def _sm_count_idx(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Multiprocessors of `device`, for persistent grids (act-quant, decode GEMV)."""
    if device.type != "cuda":  # the interpreter: one "SM", so a persistent program walks several tiles
        return 1
    return _sm_count_idx(device.index if device.index is not None else torch.cuda.current_device())


def default_fp8_impl(M: int, K: int, r_bstride: int = 0) -> str:
    """MODE_FP8 kernel choice (round 3, H100 measurements in benchmarks/NOTES-kernels.md)."""
    # measured (8192 rows, fast rounding): row 134/194 us (K=14336 none/+-1 R), persist 187/227,
    # two_phase 229/293; per-block R: two_phase 418 us, walk 491
    if K <= ROW_KERNEL_MAX_K and not r_bstride:
        return "row"
    return "two_phase"


def quantize_activation(x: torch.Tensor, input_rotation=None,
                        mode: int = MODE_MXFP4, block_m: int | None = None, nb: int | None = None,
                        num_warps: int | None = None, rot_precision: str = "tf32x3", row_kernel: bool | None = None,
                        with_scale: bool = False, fp8_impl: str | None = None,
                        programs_per_sm: int | None = None, rounding: str = "bits",
                        launch_dependents: bool = False, pdl: bool = False, silu: bool = False,
                        hadamard: str = "mma"):
    """x [M, K] (K % 32 == 0) -> per `mode`: (packed uint8 [M, K/2], scales uint8 [M, K/32]);
    (MODE_PAIRS: float16 [M, K] in `pairs_order`, scales uint8 [M, K/32]);
    fake-quantized x in x's dtype [M, K]; or (fp8 e4m3 [M, K], row exponents int32 [M])
    (+ float32 row scales 2^(E-6) [M, 1] with `with_scale`).
    MODE_FP8 `fp8_impl`: 'persist' (one pass, persistent, next rows prefetched), 'row' (one
    pass, a program per row tile), 'two_phase' (2D grid: chunk maxima, then re-read and
    write), 'walk' (round 1: a row walk, twice); None picks `default_fp8_impl`.
    `input_rotation`: None, a tensor, or a `Rotation` (sign-matrix fast path).
    rounding (MODE_FP8 row/persist/two_phase): "bits" (default since round 8: select-free, -7 %
    at K = 4096 unrotated, neutral with the FWHT, H100), "fast" (round 3) or "compare"; the same
    bytes (`_fp8_from_rotated`).
    launch_dependents (MXFP4, PAIRS, DEQUANT): let a programmatic-dependent kernel queued
    next (gemm.gemv_a4 with pdl) launch as soon as this one starts.
    pdl (MXFP4, PAIRS, DEQUANT; sm90+): launch as a programmatic dependent of the kernel before
    it on the stream (whatever wrote x), which waits (griddepcontrol.wait) before reading x:
    its launch overlaps that kernel's tail. Ignored by the interpreter.
    silu: x is vLLM's gate_up [M, 2K] and the quantized activation is silu_mul(gate, up) [M, K]
    (the input of down_proj), computed in the kernel's loads (not with the persistent or
    two-phase FP8 kernels).
    hadamard (MODE_FP8 'row' with the plain Hadamard, Rotation.plain: brq-convert's R4): "mma"
    (`_act_quant_fp8_mma_kernel`, tensor cores; the FWHT under the interpreter) or "fwht" (the
    row kernel's in-register FWHT, round 5); the same bytes."""
    M, K = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    if silu:
        if K % 2:
            raise ValueError(f"silu: gate_up needs an even width, got {K}")
        K //= 2
    if K % 32:
        raise ValueError(f"activation quantization needs K % 32 == 0, got {K}")
    if rounding not in ("fast", "bits", "compare"):
        raise ValueError(f"rounding must be 'fast', 'bits' or 'compare', got {rounding!r}")
    r, sign, r_bstride = _rotation_operand(input_rotation, K, x.device, x.dtype)
    rs = sign if sign is not None else x
    if sign is not None and sign.dtype == torch.float32:
        rot_precision = "ieee"
    if mode == MODE_FP8:
        q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
        s = torch.empty(M, dtype=torch.int32, device=x.device)
        if row_kernel is not None and fp8_impl is None:  # round-2 spelling
            fp8_impl = "row" if row_kernel else "walk"
        if fp8_impl is None:
            fp8_impl = default_fp8_impl(M, K, r_bstride)
        if fp8_impl in ("row", "persist") and (K > ROW_KERNEL_MAX_K or r_bstride):
            raise ValueError("the one-pass FP8 kernels take K <= 16384 and a shared rotation")
        if silu and fp8_impl not in ("row", "walk"):
            raise ValueError(f"silu is fused into the 'row' and 'walk' FP8 kernels, not {fp8_impl!r}")
        sc = torch.empty(M, 1, dtype=torch.float32, device=x.device)
        args = (x, r if r is not None else x, rs)
        if hadamard not in ("mma", "fwht"):
            raise ValueError(f"hadamard must be 'mma' or 'fwht', got {hadamard!r}")
        if (fp8_impl == "row" and hadamard == "mma" and isinstance(input_rotation, Rotation) and input_rotation.plain
                and K <= ROW_KERNEL_MAX_K):
            nu = max(32, triton.next_power_of_2(K // 8))
            # one row per program; H100 (act_quant_sweep.py): 8 warps at K = 14336 (16 with SiLU-mul)
            warps = num_warps or (4 if nu < 1024 else 16 if silu else 8)
            _act_quant_fp8_mma_kernel[(M,)](x, r, q, s, sc, K, x.stride(0), q.stride(0), NU=nu, ROUND=rounding,
                                            MMA=not _interpreting(), num_warps=warps,
                                            **({"SILU": True} if silu else {}))
            return (q, s, sc) if with_scale else (q, s)
        if fp8_impl in ("row", "persist"):
            nbp = triton.next_power_of_2(K // 32)
            if fp8_impl == "row":
                # measured on H100 (8192 rows): K=14336 best at 1 row / 8 warps, K=4096 at 2 rows / 4 warps;
                # with SiLU-mul in the loads (two rows of loads per row) K=14336 at 1 row / 16 warps:
                # 242-244 vs 261-268 us at 8192 rows, 40.6-41.7 vs 41.3-43.6 at 1024 (act_quant_sweep.py)
                bm = block_m or max(1 if nbp >= 256 else 2, 16 // nbp)
                warps = num_warps or (16 if silu and nbp >= 512 else 8 if nbp >= 256 else 4)
                grid = (triton.cdiv(M, bm),)
                kern = _act_quant_fp8_row_kernel
            else:
                bm = block_m or PERSIST_CFG.get(nbp, (max(1, 16 // nbp), 4, 2))[0]
                warps = num_warps or PERSIST_CFG.get(nbp, (1, 4, 2))[1]
                per_sm = programs_per_sm or PERSIST_CFG.get(nbp, (1, 4, 2))[2]
                grid = (max(1, min(triton.cdiv(M, bm), per_sm * sm_count(x.device))),)
                kern = _act_quant_fp8_persist_kernel
            kern[grid](*args, q, s, sc, M, K, x.stride(0), q.stride(0), HAS_R=r is not None,
                       SIGN=sign is not None, BM=bm, NBP=nbp, ROT_PRECISION=rot_precision, ROUND=rounding,
                       HAD=isinstance(input_rotation, Rotation) and input_rotation.hadamard,
                       PLAIN=isinstance(input_rotation, Rotation) and input_rotation.plain, num_warps=warps,
                       **({"SILU": True} if silu else {}))
            return (q, s, sc) if with_scale else (q, s)
        if fp8_impl == "two_phase":
            bm = block_m or (16 if M > 16 else triton.next_power_of_2(M))
            nb = nb or max(4, 64 // bm)
            n_chunks = triton.cdiv(K, nb * 32)
            pm = torch.empty(M, n_chunks, dtype=torch.int32, device=x.device)
            grid = (triton.cdiv(M, bm), n_chunks)
            kw = dict(R_BSTRIDE=r_bstride, HAS_R=r is not None, BM=bm, NB=nb, ROT_PRECISION=rot_precision,
                      SIGN=sign is not None, num_warps=num_warps or 4)
            _fp8_chunk_max_kernel[grid](*args, pm, M, K, x.stride(0), n_chunks, **kw)
            _fp8_apply_kernel[grid](*args, pm, q, s, sc, M, K, x.stride(0), q.stride(0), n_chunks,
                                    NCP=triton.next_power_of_2(n_chunks), ROUND=rounding, **kw)
            return (q, s, sc) if with_scale else (q, s)
        if fp8_impl != "walk":
            raise ValueError(f"unknown fp8_impl {fp8_impl!r}")
        if with_scale:
            raise ValueError("with_scale needs the one-pass or two-phase FP8 kernels")
    elif mode in (MODE_MXFP4, MODE_PAIRS):
        q = torch.empty(M, K // 2 if mode == MODE_MXFP4 else K, dtype=torch.uint8 if mode == MODE_MXFP4 else torch.float16,
                        device=x.device)
        s = torch.empty(M, K // 32, dtype=torch.uint8, device=x.device)
    else:
        q = torch.empty(M, K, dtype=x.dtype, device=x.device)
        s = q  # unused
    if block_m is None:
        block_m = 16 if mode == MODE_FP8 or M > 16 or r_bstride else triton.next_power_of_2(M)
    nb = nb or (8 if mode == MODE_FP8 else max(4, 16 // block_m))
    grid = (triton.cdiv(M, block_m), 1 if mode == MODE_FP8 else triton.cdiv(K, nb * 32))
    _act_quant_kernel[grid](
        x, r if r is not None else x, rs, q, s, M, K, x.stride(0), q.stride(0),
        s.stride(0) if s.dim() == 2 else 1,
        R_BSTRIDE=r_bstride, HAS_R=r is not None, MODE=mode, BM=block_m, NB=nb,
        ROT_PRECISION=rot_precision, SIGN=sign is not None, LAUNCH_DEPENDENTS=launch_dependents and not _interpreting(),
        SILU=silu, num_warps=num_warps or 4, **_pdl_launch(pdl and not _interpreting()))
    return q if mode == MODE_DEQUANT else (q, s)
