"""The FP8 lm_head's activation quantization: x -> (e4m3 rows, float32 scale per row).

An FP8 lm_head (format version 2, `brq-convert --lm-head fp8`) halves the bytes of the
largest single weight a decode step reads (Llama-3-8B: 1.05 GB in bf16, 0.53 GB in e4m3).
Its GEMM is the FP8 GEMM the W4A4 prefill already runs (`dispatch.scaled_mm_fp8`: vLLM's
CUTLASS scaled_mm, else torch._scaled_mm); this kernel makes its activation operand in one
launch, one program per row: the row's absolute maximum, then the codes.
Reference: kernels/reference.py `fp8_rows_reference` (bit-identical: IEEE division, the same
clamp, then round to nearest even onto the e4m3 grid in float32 before the conversion, so the
conversion itself is exact: Triton's interpreter rounds 127.6 to 64, not 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_brq.kernels.reference import E4M3_MAX, FP8_MIN_SCALE

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
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
                     MAX: tl.constexpr, MIN_SCALE: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, CHUNK)
    amax = tl.zeros([CHUNK], dtype=tl.float32)
    for k in range(0, K, CHUNK):
        v = tl.load(x_ptr + row * stride_x + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    s = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), MAX), MIN_SCALE)
    for k in range(0, K, CHUNK):
        v = tl.load(x_ptr + row * stride_x + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(v, s), -MAX), MAX)
        tl.store(q_ptr + row * stride_q + k + cols, _round_e4m3(q).to(tl.float8e4nv), mask=k + cols < K)
    tl.store(s_ptr + row, s)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (16- or 32-bit float) -> (e4m3 [M, K], float32 [M, 1]), as fp8_rows_reference."""
    M, K = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M:
        _fp8_rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), MAX=E4M3_MAX, MIN_SCALE=FP8_MIN_SCALE,
                               CHUNK=CHUNK, num_warps=4)
    return q, s
