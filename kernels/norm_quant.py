"""RMSNorm (after the residual add, optionally) fused with the activation quantization.

The input of a norm-fused BRQ linear (vllm_brq/fusion.py rewrites vLLM's graph so that
"(add +) RMSNorm -> brq linear" becomes one op): the normalized activation goes from
registers straight to the GEMM's operand, so it is never written in bf16 and read back,
and one kernel launch per linear goes away.
Reference: kernels/reference.py `rms_norm_reference` (vLLM's IR definition), then the
act-quant references. Two outputs, as act_quant.py's modes of the same name:

- MODE_FP8 (prefill, sm90): one program holds BM whole rows, so x (and the residual) are
  read once: sum, the row's mean square, the norm, the row exponent, the e4m3 operand. With
  R1 online's plain Hadamard, one row per program in the tensor-core Hadamard's layout
  (`_norm_fp8_mma_kernel`).
- MODE_PAIRS (decode): a 2D grid (rows x chunks of NB blocks) as the plain act-quant; each
  program first sums the squares of its whole rows (one load of up to SUM_NB blocks per row:
  the loads of a loop run one after the other, a round trip each), then normalizes and
  quantizes its chunk, and writes that chunk of the residual.
- Either mode rotates the normalized row per 32-block first when the linear has a shared
  input rotation (R1 online), as act_quant does for R4.

The norm's float32 sum runs in another order than torch's mean, so the normalized value
can differ from the reference by one bf16 ulp (and then a code by one step) where the
reciprocal root lands on a rounding boundary; the quantization after it is act_quant's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from vllm_brq.kernels.act_quant import (MODE_FP8, MODE_PAIRS, Rotation, _block_codes, _fp8_row_tile, _interpreting,
                                        _pdl_launch, _rotate, _rotation_operand, fp8_mma_row, store_pairs)


@triton.jit
def _load_sum(x_ptr, r_ptr, o_ptr, offs_m, k0, M, K, stride_xm, stride_rm, stride_om,
              NB: tl.constexpr, HAS_RES: tl.constexpr, STORE_RES: tl.constexpr):
    """h = x (+ residual) in float32 [NB, BM, 32], the NB blocks from column k0 of rows offs_m;
    STORE_RES writes h in x's dtype to o (the residual stream's next value)."""
    cols = k0 + tl.arange(0, NB)[:, None, None] * 32 + tl.arange(0, 32)[None, None, :]
    msk = (offs_m < M)[None, :, None] & (cols < K)
    rows = offs_m.to(tl.int64)[None, :, None]
    x = tl.load(x_ptr + rows * stride_xm + cols, mask=msk, other=0.0)
    h = x.to(tl.float32)
    if HAS_RES:
        h = h + tl.load(r_ptr + rows * stride_rm + cols, mask=msk, other=0.0).to(tl.float32)
        if STORE_RES:
            tl.store(o_ptr + rows * stride_om + cols, h.to(x.dtype), mask=msk)
    return h


@triton.jit
def _sum_squares(h):
    return tl.sum(tl.sum(h * h, axis=2), axis=0)


@triton.jit
def _inv_rms(ss, K, eps):
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(ss, K * 1.0) + eps))


@triton.jit
def _scale(h, inv, w):
    """(h * inv) rounded to the weight's dtype, times the weight (one rounding: the product of
    two 16-bit floats is exact in float32), as float32; inv and w broadcast against h."""
    n = (h * inv).to(w.dtype).to(tl.float32)
    return (n * w.to(tl.float32)).to(w.dtype).to(tl.float32)


@triton.jit
def _normalize(h, ss, w_ptr, k0, K, eps, NB: tl.constexpr):
    """The RMSNorm of h [NB, BM, 32] (float32) from its rows' sums of squares ss [BM]."""
    cols = k0 + tl.arange(0, NB)[:, None] * 32 + tl.arange(0, 32)[None, :]
    w = tl.load(w_ptr + cols, mask=cols < K, other=0.0)
    return _scale(h, _inv_rms(ss, K, eps)[None, :, None], w[:, None, :])


@triton.jit
def _norm_fp8_row_kernel(x_ptr, r_ptr, o_ptr, w_ptr, rot_ptr, rs_ptr, q_ptr, e_ptr, sc_ptr, M, K, stride_xm,
                         stride_rm, stride_om, stride_qm, eps, HAS_RES: tl.constexpr, BM: tl.constexpr,
                         NBP: tl.constexpr, ROUND: tl.constexpr, HAS_R: tl.constexpr = False,
                         SIGN: tl.constexpr = False, HAD: tl.constexpr = False, PLAIN: tl.constexpr = False,
                         ROT_PRECISION: tl.constexpr = "ieee"):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    h = _load_sum(x_ptr, r_ptr, o_ptr, offs_m, 0, M, K, stride_xm, stride_rm, stride_om, NBP, HAS_RES, True)
    n = _normalize(h, _sum_squares(h), w_ptr, 0, K, eps, NBP).to(x_ptr.dtype.element_ty)
    _fp8_row_tile(n, rot_ptr, rs_ptr, q_ptr, e_ptr, sc_ptr, offs_m, M, K, stride_qm, HAS_R, SIGN, BM, NBP,
                  ROT_PRECISION, ROUND, HAD, PLAIN)


@triton.jit
def _norm_fp8_mma_kernel(x_ptr, r_ptr, o_ptr, w_ptr, rot_ptr, q_ptr, e_ptr, sc_ptr, K, stride_xm, stride_rm, stride_om,
                         stride_qm, eps, HAS_RES: tl.constexpr, NU: tl.constexpr, ROUND: tl.constexpr,
                         MMA: tl.constexpr):
    """MODE_FP8 with the plain Hadamard (R1 online): one row per program in the tensor-core
    Hadamard's layout (act_quant `_act_quant_fp8_mma_kernel`: NU units of 8 elements), normalized
    in registers, then that kernel's tail (`fp8_mma_row`)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, NU)[:, None] * 8 + tl.arange(0, 8)[None, :]
    msk = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=msk, other=0.0)
    h = x.to(tl.float32)
    if HAS_RES:
        h = h + tl.load(r_ptr + row * stride_rm + offs, mask=msk, other=0.0).to(tl.float32)
        tl.store(o_ptr + row * stride_om + offs, h.to(x.dtype), mask=msk)
    w = tl.load(w_ptr + offs, mask=msk, other=0.0)
    n = _scale(h, _inv_rms(tl.sum(tl.sum(h * h, axis=1), axis=0), K, eps), w).to(x.dtype)
    fp8_mma_row(n, rot_ptr, q_ptr, e_ptr, sc_ptr, row, offs, msk, stride_qm, NU, ROUND, MMA)


@triton.jit
def _norm_pairs_kernel(x_ptr, r_ptr, o_ptr, w_ptr, rot_ptr, rs_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_rm,
                       stride_om, stride_qm, stride_sm, eps, HAS_RES: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr,
                       SUM_NB: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr, WAIT_PRIMARY: tl.constexpr = False,
                       HAS_R: tl.constexpr = False, SIGN: tl.constexpr = False, ROT_PRECISION: tl.constexpr = "ieee"):
    if LAUNCH_DEPENDENTS:  # the PDL-launched gemv after this may start streaming its weights now
        gdc_launch_dependents()
    if WAIT_PRIMARY:  # launched as a programmatic dependent: x is complete only after the wait
        gdc_wait()
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    ss = tl.zeros([BM], dtype=tl.float32)
    for k in range(0, K, SUM_NB * 32):  # one load for rows up to SUM_NB blocks (a loop's loads do not overlap)
        ss += _sum_squares(_load_sum(x_ptr, r_ptr, o_ptr, offs_m, k, M, K, stride_xm, stride_rm, stride_om,
                                     SUM_NB, HAS_RES, False))
    k0 = tl.program_id(1) * NB * 32
    h = _load_sum(x_ptr, r_ptr, o_ptr, offs_m, k0, M, K, stride_xm, stride_rm, stride_om, NB, HAS_RES, True)
    n = _normalize(h, ss, w_ptr, k0, K, eps, NB)
    if HAS_R:  # R1 online: the normalized activation (rounded to x's dtype, as the reference) times R
        n = _rotate(n.to(x_ptr.dtype.element_ty), rot_ptr, tl.arange(0, NB), tl.arange(0, 32), 0, 0, BM, NB, HAS_R,
                    ROT_PRECISION, SIGN, rs_ptr)
    e, code = _block_codes(n)
    store_pairs(q_ptr, s_ptr, e, code, offs_m, k0, M, K, stride_qm, stride_sm, NB)


def rms_norm_quantize(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, mode: int,
                      rounding: str = "bits", launch_dependents: bool = False, pdl: bool = False,
                      nb: int | None = None, num_warps: int | None = None, input_rotation=None,
                      hadamard: str = "mma"):
    """x [M, K] (+ residual [M, K]) -> RMSNorm with `weight` [K] -> MXFP4 as act_quant's `mode`:
    (rotated per 32-block by `input_rotation` first, a shared [32, 32] tensor or act_quant.Rotation:
    R1 online; MODE_FP8 rotates the plain Hadamard (Rotation.plain, brq-convert's R1) on tensor
    cores with hadamard "mma", as act_quant's R4, else a Rotation.hadamard by the row kernel's FWHT)
    MODE_FP8: (e4m3 [M, K], row exponents int32 [M], float32 row scales [M, 1], residual_out);
    MODE_PAIRS: (float16 [M, K] in pairs_order, E8M0 scales uint8 [M, K/32], residual_out).
    residual_out = x + residual in x's dtype (None without a residual). launch_dependents /
    pdl (MODE_PAIRS) as act_quant.quantize_activation's; nb / num_warps (MODE_PAIRS): blocks per
    program and warps, for launch-shape measurements (benchmarks/norm_pairs_sweep.py)."""
    M, K = x.shape
    if K % 32:
        raise ValueError(f"activation quantization needs K % 32 == 0, got {K}")
    if weight.shape != (K,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm_quantize: x {tuple(x.shape)}, residual "
                         f"{None if residual is None else tuple(residual.shape)}, weight {tuple(weight.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    res = None if residual is None else (residual if residual.stride(-1) == 1 else residual.contiguous())
    out = None if res is None else torch.empty_like(x)
    weight = weight.contiguous()
    r_args = (res if res is not None else x, out if out is not None else x)
    rot, sign, r_bstride = _rotation_operand(input_rotation, K, x.device, x.dtype)
    if r_bstride:
        raise ValueError("rms_norm_quantize fuses a shared [32, 32] rotation only")
    had = isinstance(input_rotation, Rotation) and input_rotation.hadamard
    rot_kw = dict(HAS_R=rot is not None, SIGN=sign is not None,
                  ROT_PRECISION="ieee" if sign is not None and sign.dtype == torch.float32 else "tf32x3")
    rot_args = (rot if rot is not None else x, sign if sign is not None else x)
    r_strides = (res.stride(0) if res is not None else 0, out.stride(0) if out is not None else 0)
    if mode == MODE_FP8:
        nbp = triton.next_power_of_2(K // 32)
        q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
        e = torch.empty(M, dtype=torch.int32, device=x.device)
        sc = torch.empty(M, 1, dtype=torch.float32, device=x.device)
        if had and input_rotation.plain and hadamard == "mma":
            # H100, norm + qkv at M = 4096: the row kernel's FWHT made the fused segment slower than
            # Inductor's norm + this layout's act-quant (benchmarks/bench_norm_quant.py, qkv_r1)
            nu = max(32, triton.next_power_of_2(K // 8))
            _norm_fp8_mma_kernel[(M,)](x, *r_args, weight, rot, q, e, sc, K, x.stride(0), *r_strides, q.stride(0),
                                       eps, HAS_RES=res is not None, NU=nu, ROUND=rounding, MMA=not _interpreting(),
                                       num_warps=4 if nu < 1024 else 8)
            return q, e, sc, out
        bm = max(1 if nbp >= 256 else 2, 16 // nbp)  # as act_quant's one-pass row kernel
        _norm_fp8_row_kernel[(triton.cdiv(M, bm),)](
            x, *r_args, weight, *rot_args, q, e, sc, M, K, x.stride(0), *r_strides, q.stride(0), eps,
            HAS_RES=res is not None, BM=bm, NBP=nbp, ROUND=rounding, HAD=had,
            PLAIN=had and input_rotation.plain, num_warps=8 if nbp >= 256 else 4, **rot_kw)
        return q, e, sc, out
    if mode != MODE_PAIRS:
        raise ValueError(f"rms_norm_quantize takes MODE_FP8 or MODE_PAIRS, got {mode}")
    q = torch.empty(M, K, dtype=torch.float16, device=x.device)
    s = torch.empty(M, K // 32, dtype=torch.uint8, device=x.device)
    if nb is not None and (nb < 1 or nb & (nb - 1)):
        raise ValueError(f"rms_norm_quantize: nb (blocks per program) must be a power of two, got {nb}")
    bm = 16 if M > 16 else triton.next_power_of_2(M)
    nb = nb or max(4, 16 // bm)
    # M = 1 on 8 warps: the norm + qkv decode segment 9.3-9.4 vs 10.3-10.4 us with 4 (H100, three runs,
    # benchmarks/norm_pairs_sweep.py); the whole-row sum of squares is spread over twice the threads
    _norm_pairs_kernel[(triton.cdiv(M, bm), triton.cdiv(K, nb * 32))](
        x, *r_args, weight, *rot_args, q, s, M, K, x.stride(0), *r_strides, q.stride(0), s.stride(0), eps,
        HAS_RES=res is not None, BM=bm, NB=nb, SUM_NB=min(triton.next_power_of_2(K // 32), 256 // bm),
        LAUNCH_DEPENDENTS=launch_dependents and not _interpreting(),
        num_warps=num_warps or (8 if bm == 1 else 4), **_pdl_launch(pdl and not _interpreting()), **rot_kw)
    return q, s, out
