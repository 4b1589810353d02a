"""MXFP4 GEMMs over packed weights (uint8 [N, K/2] + E8M0 [N, K/32], as the checkpoint stores them).

References: kernels/reference.py (`brq_linear_reference`, exact; `brq_linear_fp8_reference`,
the FP8 path's numerics). Every kernel reads the 4.25-bit weights and converts them in
registers; y[M, N] = A[M, K] W[N, K]^T accumulates in float32.

- `w4a4_fp8`: sm90 prefill. A is the activation already FP8-re-encoded by the act-quant
  kernel (e4m3 + row exponent). Each weight row is re-encoded the same way on the fly
  (a prologue reads the row's scales for its largest exponent), so the whole product is
  one e4m3 tensor-core GEMM with a power of two per row and per column in the epilogue.
  Exact MXFP4 up to blocks more than 14 binades below their row's largest (flushed).
- `w4a16`: A in bf16/fp16, weights dequantized exactly in registers. Serves W4A16
  checkpoints, and W4A4 at small M with A = the fake-quantized activation (exact MXFP4).
  With SWAP the weight tile is the MMA's M side, so decode (M <= 16) wastes no MMA rows
  and each program streams BN weight rows over the whole K (bandwidth-bound).
- `gemv` (M <= 4, bf16/fp16 A) and `gemv_a4` (W4A4 decode, A in the act-quant's MODE_PAIRS):
  bandwidth-bound, no tensor cores; gemv_a4's inner loop is inline PTX over int32 words of
  nibbles and fp16x2 FMAs, exact within each 32-block.
- `dequantize`: packed weights -> exact bf16/fp16/fp32 [N, K] in one pass, for W4A16
  prefill as dequantize + cuBLAS (M > 64; BRQ_W4A16_DEQUANT=0 keeps `w4a16`; kernels/dispatch.py).
- `w4a4_dot_scaled`: sm100+, native `tl.dot_scaled` with e2m1 operands (not measurable on
  Hopper, where it upcasts to bf16 and was measured at 0.30-0.36x of cuBLAS bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from vllm_brq.kernels.act_quant import e2m1_bits, sm_count


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles share each weight column tile while it is in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _codes(p, BN: tl.constexpr, BK: tl.constexpr):
    """Packed bytes [BN, BK/2] -> codes int32 [BN, BK] (element 2i from the low nibble)."""
    p = p.to(tl.int32)
    return tl.reshape(tl.join(p & 15, p >> 4), [BN, BK])


@triton.jit
def _weight_fp8(p, s, smax, BN: tl.constexpr, BK: tl.constexpr):
    """Packed weight tile -> e4m3 [BN, BK]: E2M1 * 2^(s - smax + 6), flushed below -14 binades.
    The power of two is added to the float32 exponent field (the base is >= 2^-1, the
    shift >= -8, so it stays normal), then one exact float32 -> e4m3 conversion."""
    bits = tl.reshape(e2m1_bits(_codes(p, BN, BK)), [BN, BK // 32, 32])
    d = s.to(tl.int32) - smax[:, None]
    shift = ((tl.maximum(d, -14) + 6) << 23)[:, :, None]
    keep = ((bits & 0x7FFFFFFF) != 0) & (d >= -14)[:, :, None]
    v = tl.where(keep, bits + shift, 0).to(tl.float32, bitcast=True)
    return tl.reshape(v, [BN, BK]).to(tl.float8e4nv)


@triton.jit
def _weight_dequant(p, s, BN: tl.constexpr, BK: tl.constexpr, DTYPE: tl.constexpr):
    """Packed weight tile -> exact values [BN, BK] in DTYPE (E2M1 * 2^(s-127); code 0 -> 2^-127)."""
    v = tl.reshape(e2m1_bits(_codes(p, BN, BK)).to(tl.float32, bitcast=True), [BN, BK // 32, 32])
    si = s.to(tl.int32)
    scale = tl.where(si > 0, (si << 23).to(tl.float32, bitcast=True), 2.0 ** -127)
    return tl.reshape(v * scale[:, :, None], [BN, BK]).to(DTYPE)


@triton.jit
def _pow2_clamped(e):
    """2^e for integer e, clamped to float32's normal range [-126, 127]."""
    return ((tl.minimum(tl.maximum(e, -126), 127) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _k_tile(a_rows, w_rows, s_rows, k0, offs_k, offs_m, M, n_ok, K, BK: tl.constexpr):
    """The K tile at k0 of the tensor-core GEMMs (offs_k = arange(BK)): activation [BM, BK],
    packed weight bytes [BN, BK/2] and E8M0 scales [BN, BK/32], zero past M, N and K."""
    k_ok = (k0 + offs_k) < K
    a = tl.load(a_rows + k0 + offs_k[None, :], mask=(offs_m < M)[:, None] & k_ok[None, :], other=0.0)
    kp = k0 // 2 + tl.arange(0, BK // 2)
    p = tl.load(w_rows + kp[None, :], mask=n_ok[:, None] & (kp < K // 2)[None, :], other=0)
    ks = k0 // 32 + tl.arange(0, BK // 32)
    s = tl.load(s_rows + ks[None, :], mask=n_ok[:, None] & (ks < K // 32)[None, :], other=0)
    return a, p, s


@triton.jit
def _dot_acc(a, w, acc, SWAP: tl.constexpr):
    """acc += a w^T, or with SWAP (weights on the MMA's M side, acc [BN, BM]) acc += w a^T."""
    if SWAP:  # both branches assign: a constexpr `if` with an early return still builds the other dot
        acc = tl.dot(w, tl.trans(a), acc)
    else:
        acc = tl.dot(a, tl.trans(w), acc)
    return acc


@triton.jit
def _store(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, bias_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def _configs(swap_options, bms, bns, bks, warps_stages):
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "SWAP": sw, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for sw in swap_options for bm in bms for bn in bns for bk in bks for (w, st) in warps_stages]


_FP8_CONFIGS = (
    _configs([False], [128], [128, 256], [128], [(8, 3)])
    + _configs([False], [128], [128], [64], [(4, 4), (8, 5)])
    + _configs([True], [128], [128, 256], [128], [(8, 3)])
    + _configs([False], [64], [128], [128], [(4, 4)])
)


@triton.autotune(configs=_FP8_CONFIGS, key=["M_KEY", "N", "K"])
@triton.jit
def _w4a4_fp8_kernel(a_ptr, ea_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, M_KEY,
                     stride_am, stride_wn, stride_sn, stride_cm, HAS_BIAS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr,
                     GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    s_rows = ws_ptr + offs_n.to(tl.int64)[:, None] * stride_sn
    smax = tl.zeros([BN], dtype=tl.int32)
    for k_s in range(0, K // 32, 128):
        cs = k_s + tl.arange(0, 128)
        s = tl.load(s_rows + cs[None, :], mask=n_ok[:, None] & (cs < K // 32)[None, :], other=0)
        smax = tl.maximum(smax, tl.max(s.to(tl.int32), axis=1))
    offs_k = tl.arange(0, BK)
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    for k0 in range(0, K, BK):
        a, p, s = _k_tile(a_rows, w_rows, s_rows, k0, offs_k, offs_m, M, n_ok, K, BK)
        acc = _dot_acc(a, _weight_fp8(p, s, smax, BN, BK), acc, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    ea = tl.load(ea_ptr + offs_m, mask=offs_m < M, other=0)
    acc = acc * _pow2_clamped(ea - 6)[:, None] * _pow2_clamped(smax - 127 - 6)[None, :]
    _store(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, bias_ptr, HAS_BIAS)


_W4A16_CONFIGS = (
    _configs([False], [128], [128, 256], [64], [(8, 3)])
    + _configs([True], [64], [128], [64], [(4, 4)])
    + _configs([False], [64], [128], [64], [(4, 4)])
)

_DECODE_CONFIGS = (_configs([True], [16], [16, 32, 64], [256, 512], [(4, 3)])
                   + _configs([True], [16], [16, 32], [128, 256], [(2, 5), (4, 6)]))


@triton.jit
def _w4a16_body(a_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_sn,
                stride_cm, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, SWAP: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    s_rows = ws_ptr + offs_n.to(tl.int64)[:, None] * stride_sn
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    offs_k = tl.arange(0, BK)
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        a, p, s = _k_tile(a_rows, w_rows, s_rows, k0, offs_k, offs_m, M, n_ok, K, BK)
        acc = _dot_acc(a, _weight_dequant(p, s, BN, BK, a_ptr.dtype.element_ty), acc, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    _store(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, bias_ptr, HAS_BIAS)


@triton.autotune(configs=_W4A16_CONFIGS, key=["M_KEY", "N", "K"])
@triton.jit
def _w4a16_kernel(a_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, M_KEY, stride_am, stride_wn,
                  stride_sn, stride_cm, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, SWAP: tl.constexpr, GROUP_M: tl.constexpr):
    _w4a16_body(a_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_sn,
                stride_cm, HAS_BIAS, BM, BN, BK, SWAP, GROUP_M)


@triton.autotune(configs=_DECODE_CONFIGS, key=["M_KEY", "N", "K"])
@triton.jit
def _decode_kernel(a_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, M_KEY, stride_am, stride_wn,
                   stride_sn, stride_cm, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, SWAP: tl.constexpr, GROUP_M: tl.constexpr):
    _w4a16_body(a_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_sn,
                stride_cm, HAS_BIAS, BM, BN, BK, SWAP, GROUP_M)


@triton.jit
def _w4a4_dot_scaled_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K,
                            stride_am, stride_asm, stride_wn, stride_sn, stride_cm,
                            HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = (offs_m < M)[:, None]
    n_ok = (offs_n < N)[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kp = k0 // 2 + tl.arange(0, BK // 2)
        ks = k0 // 32 + tl.arange(0, BK // 32)
        kp_ok = (kp < K // 2)[None, :]
        ks_ok = (ks < K // 32)[None, :]
        a = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + kp[None, :], mask=m_ok & kp_ok, other=0)
        sa = tl.load(as_ptr + offs_m.to(tl.int64)[:, None] * stride_asm + ks[None, :], mask=m_ok & ks_ok, other=0)
        w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + kp[None, :], mask=n_ok & kp_ok, other=0)
        sw = tl.load(ws_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + ks[None, :], mask=n_ok & ks_ok, other=0)
        acc = tl.dot_scaled(a, sa, "e2m1", tl.trans(w), sw, "e2m1", acc)
    _store(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, bias_ptr, HAS_BIAS)


@triton.jit
def _nibbles_f16(p, USE_ASM: tl.constexpr):
    """Packed bytes -> (low, high) nibble E2M1 values * 2^-14 as float16: the 3 magnitude bits
    go to the bottom of the exponent field and the top of the mantissa (E2M1 0.5 becomes the
    subnormal 2^-15, every other value a normal), the sign bit to the sign: no table, no select.
    USE_ASM does 4 bytes per 32-bit register (prmt + shifts/masks, 2 values per instruction)."""
    if USE_ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 z, t0, t1, u, v;
            mov.b32 z, 0;
            prmt.b32 t0, $4, z, 0x4140;
            prmt.b32 t1, $4, z, 0x4342;
            shl.b32 u, t0, 9;  and.b32 u, u, 0x0E000E00; shl.b32 v, t0, 12; and.b32 v, v, 0x80008000; or.b32 $0, u, v;
            shl.b32 u, t1, 9;  and.b32 u, u, 0x0E000E00; shl.b32 v, t1, 12; and.b32 v, v, 0x80008000; or.b32 $1, u, v;
            shl.b32 u, t0, 5;  and.b32 u, u, 0x0E000E00; shl.b32 v, t0, 8;  and.b32 v, v, 0x80008000; or.b32 $2, u, v;
            shl.b32 u, t1, 5;  and.b32 u, u, 0x0E000E00; shl.b32 v, t1, 8;  and.b32 v, v, 0x80008000; or.b32 $3, u, v;
            }
            """,
            constraints="=r,=r,=r,=r,r", args=[p], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        b = p.to(tl.int32)
        lo = (((b & 7) << 9) | ((b & 8) << 12)).to(tl.int16).to(tl.float16, bitcast=True)
        hi = (((b & 0x70) << 5) | ((b & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True)
    return lo, hi


_GEMV_CONFIGS = [triton.Config({"BN": bn, "NBK": nbk}, num_warps=w, num_stages=st)
                 for bn, nbk, w in ((4, 64, 4), (8, 32, 4), (8, 64, 8), (16, 32, 8), (16, 16, 4))
                 for st in (1, 3)]


@triton.jit
def _gemv_body(a_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_sn,
               stride_cm, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NBK: tl.constexpr,
               USE_ASM: tl.constexpr):
    """y[m, n] = sum_k a[m, k] w[n, k] for M <= BM (tiny): no tensor cores, no unpack reshape.
    A program owns BN weight rows over all of K and streams them as [BN, NBK, 16] byte tiles
    (16-byte loads: one 32-block's codes); the activation is read at even/odd columns to meet
    the low/high nibbles, each 32-block's sum is scaled by 2^(s - 127 + 14) once."""
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    offs_b = tl.arange(0, NBK)
    offs_j = tl.arange(0, 16)
    offs_mm = tl.arange(0, BM)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn
    s_rows = ws_ptr + offs_n.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(0, K // 32, NBK):
        blk = kb + offs_b
        b_ok = blk < K // 32
        p = tl.load(w_rows + blk[None, :, None] * 16 + offs_j[None, None, :],
                    mask=n_ok[:, None, None] & b_ok[None, :, None], other=0)
        s = tl.load(s_rows + blk[None, :], mask=n_ok[:, None] & b_ok[None, :], other=0).to(tl.int32)
        lo, hi = _nibbles_f16(p, USE_ASM)
        lo = lo.to(tl.float32)
        hi = hi.to(tl.float32)
        # 2^(s - 113); s = 0 (2^-127) -> 2^-113, s > 240 saturates (weights beyond 2^113: not MXFP4 in practice)
        sc = ((tl.minimum(s, 240) + 14) << 23).to(tl.float32, bitcast=True)
        for m in tl.static_range(BM):
            offs_c = tl.arange(0, 32)
            a_ok = b_ok[:, None] & ((offs_c + m) < M + offs_c)[None, :]
            a = tl.load(a_ptr + m * stride_am + blk[:, None] * 32 + offs_c[None, :], mask=a_ok, other=0.0)
            ae, ao = tl.split(tl.reshape(a.to(tl.float32), [NBK, 16, 2]))  # even / odd columns
            part = tl.sum(lo * ae[None, :, :] + hi * ao[None, :, :], axis=2)  # [BN, NBK]
            row = tl.sum(part * sc, axis=1)  # [BN]
            acc += tl.where(offs_mm[:, None] == m, row[None, :], 0.0)
    _store(c_ptr, acc, offs_mm, offs_n, M, N, stride_cm, bias_ptr, HAS_BIAS)


@triton.autotune(configs=_GEMV_CONFIGS, key=["M_KEY", "N", "K"])
@triton.jit
def _gemv_kernel(a_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, M_KEY, stride_am, stride_wn, stride_sn,
                 stride_cm, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NBK: tl.constexpr,
                 USE_ASM: tl.constexpr):
    _gemv_body(a_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_sn, stride_cm,
               HAS_BIAS, BM, BN, NBK, USE_ASM)


GEMV_MAX_M = 4  # at or below: the FMA kernel (_gemv_body); above: tensor cores


def gemv(a, weight_packed, weight_scale, bias=None, config=None, use_asm=None):
    """a [M <= GEMV_MAX_M, K] (bf16/fp16/fp32) x packed MXFP4 weights -> [M, N] in a's dtype.
    Bandwidth-bound decode: exact weights, float32 accumulation."""
    M, N, K = _check(a, weight_packed, weight_scale)
    if M > GEMV_MAX_M:
        raise ValueError(f"gemv takes M <= {GEMV_MAX_M}, got {M}")
    a = a if a.stride(-1) == 1 else a.contiguous()
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    if use_asm is None:  # measured on H100: the asm unpack wins at M = 1, plain Triton at M = 4
        use_asm = M == 1 and not _interpreting()
    bm = triton.next_power_of_2(max(M, 1))
    launch, cfg = _launcher(_gemv_kernel, config)
    launch(lambda meta: (triton.cdiv(N, meta["BN"]),))(
        a, weight_packed, weight_scale, bias if bias is not None else c, c, M, N, K, bm,
        a.stride(0), weight_packed.stride(0), weight_scale.stride(0), c.stride(0), HAS_BIAS=bias is not None,
        BM=bm, USE_ASM=use_asm, **cfg)
    return c


# (BN, NBK, warps): the two configs that won in the H100 decode chain (benchmarks/decode_layers.py,
# per shape, three runs): more CTAs than SMs, one block per thread. Every other config (its
# CANDIDATES), incl. NBK = 64, which isolated autotuning picked for down, was slower on every
# shape: down 16.67 -> 15.45 us once the list was cut to these two.
_GEMV_A4_CONFIGS = [triton.Config({"BN": bn, "NBK": nbk}, num_warps=w, num_stages=1)
                    for bn, nbk, w in ((4, 32, 4), (2, 32, 2))]

_PAIRS_DECODE = """
    shl.b32 t, $WORD, 9;  and.b32 t, t, 0x0E000E00; shl.b32 u, $WORD, 12; and.b32 u, u, 0x80008000; or.b32 d0, t, u;
    shl.b32 t, $WORD, 5;  and.b32 t, t, 0x0E000E00; shl.b32 u, $WORD, 8;  and.b32 u, u, 0x80008000; or.b32 d1, t, u;
    shl.b32 t, $WORD, 1;  and.b32 t, t, 0x0E000E00; shl.b32 u, $WORD, 4;  and.b32 u, u, 0x80008000; or.b32 d2, t, u;
    shr.b32 t, $WORD, 3;  and.b32 t, t, 0x0E000E00; and.b32 u, $WORD, 0x80008000; or.b32 d3, t, u;
"""


def _block_dot_asm(decode: str = _PAIRS_DECODE) -> str:
    """PTX for one 32-block: operands $1..$4 the weight words, $5..$20 the activation fp16x2
    registers (word-major, 4 per word), result $0 the float32 block sum. `decode` turns $WORD
    into fp16x2 d0..d3 (scratch: t, u, lo, hi; benchmarks/gemv_issue_probe.py times others)."""
    body = ["{", ".reg .b32 t, u, d0, d1, d2, d3, acc;", ".reg .b16 lo, hi;", ".reg .f32 f0, f1;", "mov.b32 acc, 0;"]
    for w in range(4):
        body.append(decode.replace("$WORD", f"${1 + w}"))
        for k in range(4):
            body.append(f"fma.rn.f16x2 acc, d{k}, ${5 + 4 * w + k}, acc;")
    body += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 f0, lo;", "cvt.f32.f16 f1, hi;", "add.f32 $0, f0, f1;", "}"]
    return "\n".join(body)


BLOCK_DOT_ASM = tl.constexpr(_block_dot_asm())
BLOCK_DOT_CONSTRAINTS = tl.constexpr("=r" + ",r" * 20)


@triton.jit
def _pairs_f16(d, LANE: tl.constexpr):
    """One 16-bit lane of an int32 holding fp16x2 -> float16 (the plain-Triton path)."""
    return ((d >> (16 * LANE)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _block_dot_plain(ws, acts):
    """_block_dot_asm in plain Triton (interpreter, tests): same decode, same fp16 order."""
    acc0 = tl.zeros(ws[0].shape, dtype=tl.float16)
    acc1 = tl.zeros(ws[0].shape, dtype=tl.float16)
    for w in tl.static_range(4):
        q = ws[w]
        for k in tl.static_range(4):
            if k == 3:  # -2147450880 = 0x80008000 (the two sign bits) as int32
                d = ((q >> 3) & 0x0E000E00) | (q & -2147450880)
            else:
                d = ((q << (9 - 4 * k)) & 0x0E000E00) | ((q << (12 - 4 * k)) & -2147450880)
            a = acts[4 * w + k]
            acc0 = acc0 + _pairs_f16(d, 0) * _pairs_f16(a, 0)
            acc1 = acc1 + _pairs_f16(d, 1) * _pairs_f16(a, 1)
    return acc0.to(tl.float32) + acc1.to(tl.float32)


@triton.jit
def _split4(x):
    """[A, B, 4] -> its 4 slices [A, B] along the last axis (register moves only)."""
    e, o = tl.split(tl.reshape(x, [x.shape[0], x.shape[1], 2, 2]))
    x0, x2 = tl.split(e)
    x1, x3 = tl.split(o)
    return x0, x1, x2, x3


@triton.jit
def _load_u8(ptrs, USE_ASM: tl.constexpr):
    """Byte loads -> int32. USE_ASM: through inline PTX, so the result keeps the pointer
    tensor's layout (a tl.load of a [BN, NBK] byte tile gets its own vectorized layout and
    a shared-memory conversion to the weight tile's)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("ld.global.nc.u8 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                         is_pure=True, pack=1)
    return tl.load(ptrs).to(tl.int32)


@triton.jit
def _w_tile_load(w_tile, s_tile, kb, KB, NBK: tl.constexpr, offs_b, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Weight words [BN, NBK, 4] and scales [BN, NBK] of the tile at block kb; blocks past the
    end read the last block (EVEN_K: a clamped tile start, so no masks) or 0 (masked)."""
    if EVEN_K:
        k0 = tl.minimum(kb, KB - NBK)
        return tl.load(w_tile + k0 * 4), _load_u8(s_tile + k0, USE_ASM)
    ok = kb + offs_b < KB
    return (tl.load(w_tile + kb * 4, mask=ok[None, :, None], other=0),
            tl.where(ok[None, :], _load_u8(s_tile + tl.minimum(kb + offs_b, KB - 1)[None, :] - offs_b[None, :], USE_ASM), 0))


@triton.jit
def _a4_tile(p, s, a_ptr, as_ptr, kb, KB, M, stride_am, stride_asm, a_tile, offs_b, offs_mm, acc1, acc,
             BM: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr):
    """gemv_a4's math on one weight tile (words p [BN, NBK, 4], scales s [BN, NBK]) at block kb,
    for each of the BM activation rows: returns acc1 (BM = 1: per-thread partial sums) and
    acc ([BM, BN]), updated."""
    w0, w1, w2, w3 = _split4(p)
    scw = ((tl.minimum(s, 241) + 13) << 23).to(tl.float32, bitcast=True)  # 2^(sw - 127 + 13)
    if EVEN_K:
        b_ok = offs_b >= 0
    else:
        b_ok = kb + offs_b < KB
    for m in tl.static_range(BM):
        mr = tl.minimum(M - 1, m)  # rows m >= M read row M-1 (not stored)
        a_blk = a_ptr + mr * stride_am + kb * 16 + a_tile  # full shape: loaded in the weights' layout
        a_ok = b_ok[None, :, None]
        a0, a1, a2, a3 = _split4(tl.load(a_blk, mask=a_ok, other=0))
        a4, a5, a6, a7 = _split4(tl.load(a_blk + 4, mask=a_ok, other=0))
        a8, a9, a10, a11 = _split4(tl.load(a_blk + 8, mask=a_ok, other=0))
        a12, a13, a14, a15 = _split4(tl.load(a_blk + 12, mask=a_ok, other=0))
        sa = tl.load(as_ptr + mr * stride_asm + kb + offs_b, mask=b_ok, other=0).to(tl.int32)
        if USE_ASM:
            part = tl.inline_asm_elementwise(
                BLOCK_DOT_ASM, BLOCK_DOT_CONSTRAINTS,
                [w0, w1, w2, w3, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15],
                dtype=tl.float32, is_pure=True, pack=1)
        else:
            part = _block_dot_plain((w0, w1, w2, w3), (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12,
                                                       a13, a14, a15))
        sca = tl.where(sa > 0, (sa << 23).to(tl.float32, bitcast=True), 2.0 ** -127)  # 2^(sa - 127)
        contrib = part * scw * sca[None, :]
        if BM == 1:
            acc1 += contrib
        else:
            acc += tl.where(offs_mm[:, None] == m, tl.sum(contrib, axis=1)[None, :], 0.0)
    return acc1, acc


ONESHOT_MAX_TILES = 4  # gemv_a4 at M = 1 requests all K tiles at once up to 4 tiles (K <= 4096 at NBK = 32)


def _oneshot_tiles(args) -> int:
    """K tiles of a one-shot gemv_a4 program (0: the two-tiles-in-flight loop)."""
    tiles = triton.cdiv(args["K"] // 32, args["NBK"])
    return tiles if args["ALLOW_ONESHOT"] and args["BM"] == 1 and tiles <= ONESHOT_MAX_TILES else 0


@triton.autotune(configs=_GEMV_A4_CONFIGS, key=["M_KEY", "N", "K"])
@triton.heuristics({"EVEN_K": lambda args: (args["K"] // 32) % args["NBK"] == 0, "ONESHOT": _oneshot_tiles})
@triton.jit
def _gemv_a4_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, M_KEY, stride_am, stride_asm,
                    stride_wn, stride_sn, stride_cm, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    NBK: tl.constexpr, USE_ASM: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
                    ALLOW_ONESHOT: tl.constexpr, ONESHOT: tl.constexpr):
    """Round 5 decode (W4A4, M <= 4). Both operands are E2M1 inside a 32-block, so a block's
    dot product is exact in fp16: the weight nibbles become fp16 E2M1 * 2^-14 by shifts and
    masks on whole int32 words (8 nibbles, 4 fp16x2 registers), the activation arrives
    already as fp16 E2M1 * 2 in the matching pair order (act-quant MODE_PAIRS), products
    E2M1^2 * 2^-13 are exact and the 16 fp16x2 FMAs per block stay exact while each lane's
    running sum is below 2^-4 (the only rounding: a lane of 16 products all near 36 * 2^-13);
    then one float32 conversion and one multiply by 2^(sw - 127) 2^(sa - 127) 2^13 per block.
    A thread reads whole blocks (16-byte weight loads, the activation from L1 in the same
    layout: no shared memory), the next tile's weights are loaded before this tile's math,
    block sums accumulate per (row, block) lane until one reduction at the end, and rows past
    N re-read row N-1 (stores are masked) so the loop has no masks when K/32 % NBK == 0.
    PDL (programmatic dependent launch): the first two weight tiles are requested before
    griddepcontrol.wait, so they stream in while the act-quant that feeds this kernel ends;
    nothing written by an earlier kernel (activation, output) is touched before the wait.
    ONESHOT = T > 0 (M = 1, at most ONESHOT_MAX_TILES K tiles): all T tiles are requested
    before any math, as a pure read streams best (benchmarks/stream_floor_probe.py: many short
    programs that issue all their loads at once), then the same math in the same order."""
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_b = tl.arange(0, NBK)
    offs_mm = tl.arange(0, BM)
    KB = K // 32
    w_tile = w_ptr + rows[:, None, None] * stride_wn + offs_b[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    s_tile = ws_ptr + rows[:, None] * stride_sn + offs_b[None, :]
    a_tile = (offs_b[None, :, None] * 16 + tl.arange(0, 4)[None, None, :]) + (rows * 0).to(tl.int32)[:, None, None]
    acc1 = tl.zeros([BN, NBK], dtype=tl.float32)  # M = 1: per-thread partial sums, reduced once at the end
    acc = tl.zeros([BM, BN], dtype=tl.float32)  # M > 1: reduced every tile
    # tiles past the end re-read the last one when EVEN_K (no masks), else masked
    p, s = _w_tile_load(w_tile, s_tile, 0, KB, NBK, offs_b, EVEN_K, USE_ASM)
    if ONESHOT > 0:  # every K tile in flight at once (a constexpr count: the branches unroll)
        if ONESHOT > 1:
            p1, s1 = _w_tile_load(w_tile, s_tile, NBK, KB, NBK, offs_b, EVEN_K, USE_ASM)
        if PDL:  # two tiles before the wait, as the loop: more would queue ahead of the act-quant's loads
            gdc_wait()
        if ONESHOT > 2:
            p2, s2 = _w_tile_load(w_tile, s_tile, 2 * NBK, KB, NBK, offs_b, EVEN_K, USE_ASM)
        if ONESHOT > 3:
            p3, s3 = _w_tile_load(w_tile, s_tile, 3 * NBK, KB, NBK, offs_b, EVEN_K, USE_ASM)
        acc1, acc = _a4_tile(p, s, a_ptr, as_ptr, 0, KB, M, stride_am, stride_asm, a_tile, offs_b, offs_mm, acc1, acc,
                             BM, EVEN_K, USE_ASM)
        if ONESHOT > 1:
            acc1, acc = _a4_tile(p1, s1, a_ptr, as_ptr, NBK, KB, M, stride_am, stride_asm, a_tile, offs_b, offs_mm,
                                 acc1, acc, BM, EVEN_K, USE_ASM)
        if ONESHOT > 2:
            acc1, acc = _a4_tile(p2, s2, a_ptr, as_ptr, 2 * NBK, KB, M, stride_am, stride_asm, a_tile, offs_b, offs_mm,
                                 acc1, acc, BM, EVEN_K, USE_ASM)
        if ONESHOT > 3:
            acc1, acc = _a4_tile(p3, s3, a_ptr, as_ptr, 3 * NBK, KB, M, stride_am, stride_asm, a_tile, offs_b, offs_mm,
                                 acc1, acc, BM, EVEN_K, USE_ASM)
    else:  # two tiles in flight: this one and the next
        p1, s1 = _w_tile_load(w_tile, s_tile, NBK, KB, NBK, offs_b, EVEN_K, USE_ASM)
        if PDL:
            gdc_wait()
        for kb in range(0, KB, NBK):
            p2, s2 = _w_tile_load(w_tile, s_tile, kb + 2 * NBK, KB, NBK, offs_b, EVEN_K, USE_ASM)
            acc1, acc = _a4_tile(p, s, a_ptr, as_ptr, kb, KB, M, stride_am, stride_asm, a_tile, offs_b, offs_mm, acc1,
                                 acc, BM, EVEN_K, USE_ASM)
            p, s, p1, s1 = p1, s1, p2, s2
    if BM == 1:
        acc = tl.sum(acc1, axis=1)[None, :]
    _store(c_ptr, acc, offs_mm, offs_n, M, N, stride_cm, bias_ptr, HAS_BIAS)


# persistent variant: (BN, NBK, warps, programs per SM); BRQ_GEMV_PERSIST=1 (experiment, unmeasured)
_GEMV_A4_PERSIST_CONFIGS = [triton.Config({"BN": bn, "NBK": nbk, "PPS": pps}, num_warps=w, num_stages=1)
                            for bn, nbk, w, pps in ((4, 32, 4, 8), (4, 32, 4, 12), (2, 32, 2, 16), (2, 32, 2, 24))]


@triton.jit
def _a4_tile_ptrs(w_ptr, ws_ptr, rt, N, stride_wn, stride_sn, offs_bn, offs_b):
    """Pointers to K tile 0 of row tile rt: words [BN, NBK, 4] and scales [BN, NBK] (rows past N
    re-read row N - 1, so a prefetch past a program's last step is harmless)."""
    rows = tl.minimum(rt * offs_bn.shape[0] + offs_bn, N - 1).to(tl.int64)
    w = w_ptr + rows[:, None, None] * stride_wn + offs_b[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    return w, ws_ptr + rows[:, None] * stride_sn + offs_b[None, :]


@triton.jit
def _a4_next_tile(w, sc, rt, kt, KT, nprog, w_ptr, ws_ptr, N, stride_wn, stride_sn, offs_bn, offs_b,
                  NBK: tl.constexpr):
    """A persistent program's next step: the next K tile (pointers advance by a tile), after the
    last one the first K tile of its next row tile (pointers rebuilt): counters, no divisions."""
    if kt == KT - 1:
        rt = rt + nprog
        kt = 0
        w, sc = _a4_tile_ptrs(w_ptr, ws_ptr, rt, N, stride_wn, stride_sn, offs_bn, offs_b)
    else:
        kt = kt + 1
        w = w + NBK * 4
        sc = sc + NBK
    return w, sc, rt, kt


@triton.autotune(configs=_GEMV_A4_PERSIST_CONFIGS, key=["N", "K"])
@triton.jit
def _gemv_a4_persist_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, N, K, stride_wn, stride_sn,
                            HAS_BIAS: tl.constexpr, BN: tl.constexpr, NBK: tl.constexpr, PPS: tl.constexpr,
                            USE_ASM: tl.constexpr, PDL: tl.constexpr):
    """gemv_a4 at M = 1 as a persistent kernel (PPS programs per SM, read by the launcher): one
    flat loop over this program's (row tile, K tile) steps keeps two weight tiles in flight
    across row-tile boundaries, so a program does not drain and refill the memory pipeline
    per row tile, and the per-CTA start (pointer setup, first round trip) is paid once per
    program instead of once per row tile. Needs K/32 % NBK == 0 (the launcher checks)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    KT = (K // 32) // NBK
    total = tl.cdiv(tl.cdiv(N, BN) - pid, nprog) * KT
    offs_bn = tl.arange(0, BN)
    offs_b = tl.arange(0, NBK)
    offs_mm = tl.arange(0, 1)
    a_tile = (offs_b[None, :, None] * 16 + tl.arange(0, 4)[None, None, :]) + (offs_bn * 0)[:, None, None]
    rt, kt = pid, 0  # the step computed now
    w, sc = _a4_tile_ptrs(w_ptr, ws_ptr, rt, N, stride_wn, stride_sn, offs_bn, offs_b)
    p, s = tl.load(w), _load_u8(sc, USE_ASM)
    wl, scl, rtl, ktl = _a4_next_tile(w, sc, rt, kt, KT, nprog, w_ptr, ws_ptr, N, stride_wn, stride_sn, offs_bn,
                                      offs_b, NBK)  # the step loaded last
    p1, s1 = tl.load(wl), _load_u8(scl, USE_ASM)
    if PDL:
        gdc_wait()
    acc1 = tl.zeros([BN, NBK], dtype=tl.float32)
    acc = tl.zeros([1, BN], dtype=tl.float32)  # unused at M = 1 (_a4_tile's BM > 1 accumulator)
    for _ in range(0, total):
        wl, scl, rtl, ktl = _a4_next_tile(wl, scl, rtl, ktl, KT, nprog, w_ptr, ws_ptr, N, stride_wn, stride_sn,
                                          offs_bn, offs_b, NBK)
        p2, s2 = tl.load(wl), _load_u8(scl, USE_ASM)
        acc1, acc = _a4_tile(p, s, a_ptr, as_ptr, kt * NBK, K // 32, 1, 0, 0, a_tile, offs_b, offs_mm, acc1, acc,
                             1, True, USE_ASM)
        if kt == KT - 1:  # the row tile is complete
            _store(c_ptr, tl.sum(acc1, axis=1)[None, :], offs_mm, rt * BN + offs_bn, 1, N, 0, bias_ptr, HAS_BIAS)
            acc1 = tl.zeros([BN, NBK], dtype=tl.float32)
            rt += nprog
            kt = 0
        else:
            kt += 1
        p, s, p1, s1 = p1, s1, p2, s2


def gemv_a4(a_pairs, a_scale, weight_packed, weight_scale, bias=None, out_dtype=torch.bfloat16, config=None,
            use_asm=None, pdl=False, persistent=False, programs=None, oneshot=True):
    """W4A4 decode: MXFP4 activation in the act-quant's MODE_PAIRS (float16 [M <= GEMV_MAX_M, K]
    + E8M0 [M, K/32]) x packed MXFP4 weights -> [M, N] in out_dtype. Exact MXFP4 product up to
    float32 accumulation (block sums in fp16 are exact below 2^-4 per lane; see the kernel).
    pdl: launch as a programmatic dependent (sm90+) of the kernel before it on the stream,
    which should trigger early (act-quant `launch_dependents`); ignored by the interpreter.
    persistent (M = 1 and K/32 % NBK == 0, else ignored): `_gemv_a4_persist_kernel` with
    `programs` programs (default: PPS per SM). oneshot (M = 1, K <= ONESHOT_MAX_TILES tiles):
    each program requests all its weight tiles before any math (False: the two-tile loop)."""
    M, K = a_pairs.shape
    N = weight_packed.shape[0]
    if (a_pairs.dtype != torch.float16 or weight_packed.shape != (N, K // 2) or weight_scale.shape != (N, K // 32)
            or a_scale.shape != (M, K // 32)):
        raise ValueError("gemv_a4: shapes/dtypes do not fit (activation: MODE_PAIRS float16 [M, K])")
    if M > GEMV_MAX_M:
        raise ValueError(f"gemv_a4 takes M <= {GEMV_MAX_M}, got {M}")
    if weight_packed.stride(0) % 4 or a_pairs.stride(0) % 2 or weight_packed.stride(1) != 1 or a_pairs.stride(1) != 1:
        raise ValueError("gemv_a4 reads int32 words: rows must be contiguous and 4-byte aligned")
    c = torch.empty(M, N, dtype=out_dtype, device=a_pairs.device)
    if use_asm is None:
        use_asm = not _interpreting()
    bm = triton.next_power_of_2(max(M, 1))
    pdl = pdl and not _interpreting()
    a32, w32 = a_pairs.view(torch.int32), weight_packed.view(torch.int32)  # the kernel reads int32 words
    nbk = config["NBK"] if config else 32  # every autotuned persistent config has NBK = 32
    if persistent and M == 1 and (K // 32) % nbk == 0:
        launch, cfg = _launcher(_gemv_a4_persist_kernel, config)
        if pdl:
            cfg["launch_pdl"] = True
        sms = sm_count(a_pairs.device)
        launch(lambda meta: (min(triton.cdiv(N, meta["BN"]), programs or sms * meta["PPS"]),))(
            a32, a_scale, w32, weight_scale, bias if bias is not None else c, c, N, K, w32.stride(0),
            weight_scale.stride(0), HAS_BIAS=bias is not None, USE_ASM=use_asm, PDL=pdl, **cfg)
        return c
    launch, cfg = _launcher(_gemv_a4_kernel, config)
    if pdl:
        cfg["launch_pdl"] = True
    launch(lambda meta: (triton.cdiv(N, meta["BN"]),))(
        a32, a_scale, w32, weight_scale, bias if bias is not None else c, c, M, N, K, bm,
        a32.stride(0), a_scale.stride(0), w32.stride(0), weight_scale.stride(0), c.stride(0),
        HAS_BIAS=bias is not None, BM=bm, USE_ASM=use_asm, PDL=pdl, ALLOW_ONESHOT=oneshot, **cfg)
    return c


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _m_key(M: int) -> int:
    """Autotuning bucket for M (powers of two up to 4096): one tuning per bucket, not per M."""
    return min(triton.next_power_of_2(max(M, 1)), 4096)


def _grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)


def _check(a, weight_packed, weight_scale):
    M, K = a.shape
    N = weight_packed.shape[0]
    if weight_packed.shape != (N, K // 2) or weight_scale.shape != (N, K // 32):
        raise ValueError(f"weights {tuple(weight_packed.shape)}/{tuple(weight_scale.shape)} do not fit K={K}")
    return M, N, K


def _launcher(kernel, config):
    """The autotuned kernel, or with `config` (a dict of meta-parameters, num_warps and
    num_stages included) its plain JIT function: tests and benchmarks pin a config."""
    if config is None:
        return lambda grid: kernel[grid], {}
    cfg = dict(config)
    return lambda grid: kernel.fn[grid], cfg


def w4a4_fp8(a_fp8, a_exp, weight_packed, weight_scale, bias=None, out_dtype=torch.bfloat16, config=None):
    """(e4m3 [M, K], int32 row exponents [M]) x packed MXFP4 weights -> [M, N] in out_dtype."""
    M, N, K = _check(a_fp8, weight_packed, weight_scale)
    c = torch.empty(M, N, dtype=out_dtype, device=a_fp8.device)
    launch, cfg = _launcher(_w4a4_fp8_kernel, config)
    launch(_grid(M, N))(
        a_fp8, a_exp, weight_packed, weight_scale, bias if bias is not None else c, c, M, N, K, _m_key(M),
        a_fp8.stride(0), weight_packed.stride(0), weight_scale.stride(0), c.stride(0), HAS_BIAS=bias is not None,
        **cfg)
    return c


def w4a16(a, weight_packed, weight_scale, bias=None, config=None):
    """a [M, K] bf16/fp16 x packed MXFP4 weights (dequantized exactly in registers) -> [M, N]."""
    M, N, K = _check(a, weight_packed, weight_scale)
    a = a if a.stride(-1) == 1 else a.contiguous()
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    launch, cfg = _launcher(_decode_kernel if M <= 16 else _w4a16_kernel, config)
    launch(_grid(M, N))(
        a, weight_packed, weight_scale, bias if bias is not None else c, c, M, N, K, _m_key(M),
        a.stride(0), weight_packed.stride(0), weight_scale.stride(0), c.stride(0), HAS_BIAS=bias is not None,
        **cfg)
    return c


@triton.jit
def _dequant_kernel(w_ptr, ws_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                    BN: tl.constexpr, BK: tl.constexpr):
    """One [BN, BK] tile of the exact dequantized weight (the reference: mxfp4.dequantize)."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]
    kp = k0 // 2 + tl.arange(0, BK // 2)
    ks = k0 // 32 + tl.arange(0, BK // 32)
    p = tl.load(w_ptr + rows * stride_wn + kp[None, :], mask=n_ok[:, None] & (kp < K // 2)[None, :], other=0)
    s = tl.load(ws_ptr + rows * stride_sn + ks[None, :], mask=n_ok[:, None] & (ks < K // 32)[None, :], other=0)
    w = _weight_dequant(p, s, BN, BK, out_ptr.dtype.element_ty)
    offs_k = k0 + tl.arange(0, BK)
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], w, mask=n_ok[:, None] & (offs_k < K)[None, :])


def dequantize(weight_packed, weight_scale, dtype=torch.bfloat16, block_n=32, block_k=256):
    """Packed MXFP4 weights -> exact values [N, K] in dtype (bf16 and fp32 hold every MXFP4
    value; fp16 as the W4A16 kernel does, by conversion). One read of the 4.25-bit weights,
    one write of the result."""
    N = weight_packed.shape[0]
    K = weight_packed.shape[1] * 2
    if weight_scale.shape != (N, K // 32):
        raise ValueError(f"weights {tuple(weight_packed.shape)}/{tuple(weight_scale.shape)} do not fit K={K}")
    out = torch.empty(N, K, dtype=dtype, device=weight_packed.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _dequant_kernel[grid](weight_packed, weight_scale, out, N, K, weight_packed.stride(0), weight_scale.stride(0),
                          out.stride(0), BN=block_n, BK=block_k)
    return out


def w4a4_dot_scaled(a_packed, a_scale, weight_packed, weight_scale, bias=None, out_dtype=torch.bfloat16,
                    block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3):
    """sm100+: MXFP4 x MXFP4 on native e2m1 tensor cores (codes+scales from the act-quant kernel)."""
    M = a_packed.shape[0]
    K = a_packed.shape[1] * 2
    N = weight_packed.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=a_packed.device)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _w4a4_dot_scaled_kernel[grid](
        a_packed, a_scale, weight_packed, weight_scale, bias if bias is not None else c, c, M, N, K,
        a_packed.stride(0), a_scale.stride(0), weight_packed.stride(0), weight_scale.stride(0), c.stride(0),
        HAS_BIAS=bias is not None, BM=block_m, BN=block_n, BK=block_k, GROUP_M=8,
        num_warps=num_warps, num_stages=num_stages)
    return c
