"""The FP8 lm_head's activation quantization: x -> two FP8 terms per row, hi then lo.

An FP8 lm_head (format version 2, `brq-convert --lm-head fp8`) halves the bytes of the
largest single weight a decode step reads (Llama-3-8B: 1.05 GB in bf16, 0.53 GB in e4m3).
Its GEMM is the FP8 GEMM the W4A4 prefill already runs (`dispatch.scaled_mm_fp8`: vLLM's
CUTLASS scaled_mm, else torch._scaled_mm). Its input goes in as x ~ q_hi s_hi + q_lo s_lo:
one FP8 term per token cost SmolLM2 +0.4 % perplexity, two cost nothing measurable, and at
decode the GEMM reads the weight once for both rows (benchmarks/head_accuracy.py). One launch,
one program per row: the row's maximum, then the hi codes and the residual's maximum, then
the lo codes. The scales are powers of two, so the residual x - q_hi s_hi is exact.
Reference: kernels/reference.py `fp8_split_reference` (bit-identical: scales from the exponent
bits, products by powers of two, round to nearest even onto the e4m3 grid in float32 before
the conversion, so the conversion itself is exact: Triton's interpreter rounds 127.6 to 64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_brq.kernels.reference import E4M3_MAX, FP8_SPLIT_MIN_EXP

CHUNK = 1024  # columns per step of a program's loops


@triton.jit
def _round_e4m3(v):
    """v (|v| <= 448) rounded to nearest even on the e4m3 grid, as float32: normals keep 3
    mantissa bits (carry into the exponent included); below 2^-6 the grid step is 2^-9,
    which adding and removing 1.5 * 2^14 rounds |v| to (the sign put back, -0 included)."""
    bits = v.to(tl.int32, bitcast=True)
    normal = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = 0xFFF00000
    sub = ((tl.abs(v) + 24576.0) - 24576.0).to(tl.int32, bitcast=True)
    sub = sub | (bits & -2147483648)  # the sign bit back (Triton's -x is 0 - x: no -0 from it)
    return tl.where(tl.abs(v) < 0.015625, sub, normal).to(tl.float32, bitcast=True)


@triton.jit
def _pow2_scale(amax, MIN_EXP: tl.constexpr):
    """(2^e, 2^-e) with e = floor(log2 amax) - 7, at least MIN_EXP, built from the bits."""
    e = tl.maximum(((amax.to(tl.int32, bitcast=True) >> 23) & 255) - 134, MIN_EXP)
    return ((e + 127) << 23).to(tl.float32, bitcast=True), ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_split_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q,
                      MAX: tl.constexpr, MIN_EXP: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, CHUNK)
    x_row, hi_row, lo_row = x_ptr + row * stride_x, q_ptr + row * stride_q, q_ptr + (row + M) * stride_q
    amax = tl.zeros([CHUNK], dtype=tl.float32)
    for k in range(0, K, CHUNK):
        v = tl.load(x_row + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    s_hi, inv_hi = _pow2_scale(tl.max(amax, axis=0), MIN_EXP)
    amax = tl.zeros([CHUNK], dtype=tl.float32)
    for k in range(0, K, CHUNK):
        v = tl.load(x_row + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
        hi = _round_e4m3(tl.minimum(tl.maximum(v * inv_hi, -MAX), MAX))
        tl.store(hi_row + k + cols, hi.to(tl.float8e4nv), mask=k + cols < K)
        amax = tl.maximum(amax, tl.abs(v - hi * s_hi))  # exact: s_hi is a power of two
    s_lo, inv_lo = _pow2_scale(tl.max(amax, axis=0), MIN_EXP)
    for k in range(0, K, CHUNK):
        v = tl.load(x_row + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
        r = v - _round_e4m3(tl.minimum(tl.maximum(v * inv_hi, -MAX), MAX)) * s_hi
        lo = _round_e4m3(tl.minimum(tl.maximum(r * inv_lo, -MAX), MAX))
        tl.store(lo_row + k + cols, lo.to(tl.float8e4nv), mask=k + cols < K)
    tl.store(s_ptr + row, s_hi)
    tl.store(s_ptr + row + M, s_lo)


def quantize_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (16- or 32-bit float) -> (e4m3 [2M, K], float32 [2M, 1]), as fp8_split_reference."""
    M, K = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(2 * M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(2 * M, 1, dtype=torch.float32, device=x.device)
    if M:
        _fp8_split_kernel[(M,)](x, q, s, M, K, x.stride(0), q.stride(0), MAX=E4M3_MAX, MIN_EXP=FP8_SPLIT_MIN_EXP,
                                CHUNK=CHUNK, num_warps=4)
    return q, s
