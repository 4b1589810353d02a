"""Plain-torch reference of the BRQ linear: the spec every backend is tested against.

y = Q(x R) Q(W)^T + b, where R is the optional online input rotation (per b-block), Q
is MXFP4 fake quantization (activations only when the checkpoint is W4A4) and the weight
arrives packed. Computed in float32, returned in x's dtype.
"""

from __future__ import annotations

import torch

from vllm_brq import mxfp4
from vllm_brq.rotation import rotate


def activation_reference(x: torch.Tensor, input_rotation: torch.Tensor | None,
                         quantize_activations: bool) -> torch.Tensor:
    """The activation side of every BRQ linear, in float32: x R per block (when the layer
    has an input rotation), then MXFP4 fake quantization (W4A4 checkpoints)."""
    xf = x.float()
    if input_rotation is not None:
        xf = rotate(xf, input_rotation.float())
    return mxfp4.fake_quantize(xf) if quantize_activations else xf


def rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """vLLM's (fused-add) RMSNorm as its IR ops define it (vllm.ir.ops.layernorm), the input of a
    norm-fused BRQ linear: h = x (+ residual) in float32; residual_out = h in x's dtype;
    normed = (h * rsqrt(mean(h^2) + eps)) rounded to weight's dtype, times weight, in x's dtype."""
    h = x.float()
    if residual is not None:
        h = h + residual.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype) * weight
    return normed.to(x.dtype), (h.to(x.dtype) if residual is not None else None)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """vLLM's SiluAndMul (forward_native) in eager torch: silu(gate) * up of gate_up [..., 2K], each
    op rounded to the input's dtype; the input of a SiLU-fused down_proj."""
    d = gate_up.shape[-1] // 2
    return torch.nn.functional.silu(gate_up[..., :d]) * gate_up[..., d:]


def quantize_activation_reference(x: torch.Tensor, input_rotation: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (packed codes [M, K/2], E8M0 scales [M, K/32]) after the optional rotation."""
    return mxfp4.quantize(activation_reference(x, input_rotation, quantize_activations=False))


def brq_linear_reference(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    input_rotation: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    quantize_activations: bool = True,
) -> torch.Tensor:
    """x [..., K] -> [..., N] with the MXFP4 weight (packed [N, K/2], scales [N, K/32])."""
    xf = activation_reference(x, input_rotation, quantize_activations)
    w = mxfp4.dequantize(weight_packed, weight_scale, torch.float32)
    y = xf @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# --- Intermediate formats of the GPU backends (kernels/act_quant.py, kernels/gemm.py) ---

FP8_TOP = 6  # the row's largest block lands on 2^6 (6 * 2^6 = 384 <= 448, the e4m3 max)
FP8_RANGE = 14  # blocks down to 2^-14 of the row's largest: 0.5 * 2^(6-14) = 2^-9, e4m3's least


def fp8_reencode_reference(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 rows (packed [R, K/2], E8M0 [R, K/32]) -> (values [R, K] float32, each exact in
    FP8 e4m3, and row exponents int32 [R]) with row = values * 2^(E - 6), E the row's largest
    block exponent. A block with exponent e is stored as E2M1 * 2^(e - E + 6): exact in e4m3
    when e - E >= -14 (FP8_RANGE); lower blocks are flushed to 0, the only deviation from
    MXFP4 (the sm90 FP8 GEMM's operand format, for activations and weights alike)."""
    e = scales.to(torch.int32) - mxfp4.SCALE_BIAS
    erow = e.amax(-1)
    d = e - erow.unsqueeze(-1)
    codes = mxfp4.unpack(packed).to(torch.long)
    vals = mxfp4.e2m1_table(packed.device)[codes].unflatten(-1, (-1, mxfp4.BLOCK))
    vals = vals * torch.exp2((d + FP8_TOP).float()).unsqueeze(-1)
    vals = torch.where((d >= -FP8_RANGE).unsqueeze(-1), vals, torch.zeros_like(vals))
    return vals.flatten(-2), erow


def pairs_order_reference() -> torch.Tensor:
    """Slot of each block element in the decode gemv's activation (act_quant.pairs_order)."""
    i = torch.arange(mxfp4.BLOCK)
    return ((i // 8) * 4 + (i % 8) % 4) * 2 + (i % 8) // 4


def pairs_reference(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 rows -> the act-quant's MODE_PAIRS operand: E2M1 * 2 in float16 [R, K], each
    32-block's elements moved to `pairs_order_reference` slots, and the E8M0 scales unchanged."""
    vals = mxfp4.e2m1_table(packed.device)[mxfp4.unpack(packed).to(torch.long)] * 2
    blocks = vals.unflatten(-1, (-1, mxfp4.BLOCK))
    out = torch.empty_like(blocks)
    out[..., pairs_order_reference().to(packed.device)] = blocks
    return out.flatten(-2).to(torch.float16), scales


def brq_linear_fp8_reference(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    input_rotation: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the sm90 W4A4 GEMM computes: both operands FP8-re-encoded (fp8_reencode_reference),
    the product in float64, row/column powers of two applied after. Equals
    brq_linear_reference up to the flushed blocks (and float32 vs float64 summation)."""
    xa, ea = fp8_reencode_reference(*quantize_activation_reference(x.reshape(-1, x.shape[-1]), input_rotation))
    wa, ew = fp8_reencode_reference(weight_packed, weight_scale)
    y = xa.double() @ wa.double().t()
    y = y * torch.exp2((ea - FP8_TOP).double()).unsqueeze(1) * torch.exp2((ew - FP8_TOP).double()).unsqueeze(0)
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


# The FP8 lm_head (format version 2): FP8 e4m3 weights with a float32 scale per row, activations
# quantized per token at run time, as vLLM's FP8 dynamic linears do.
E4M3_MAX = 448.0
FP8_MIN_SCALE = 1.0 / (E4M3_MAX * 512)  # an all-zero row keeps a finite scale


def fp8_row_scales(x: torch.Tensor) -> torch.Tensor:
    """float32 [M, 1]: max|x_row| / 448, so a row's largest value maps to e4m3's largest."""
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    # a tensor divisor: torch on CUDA turns division by a Python scalar into a product with its
    # rounded reciprocal, which is not the IEEE quotient the kernel computes
    return (amax / torch.full_like(amax, E4M3_MAX)).clamp_min(FP8_MIN_SCALE)


def fp8_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8: (e4m3 [M, K], float32 scales [M, 1]) with x ~ q * s, s = max|x_row| / 448."""
    s = fp8_row_scales(x)
    q = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s


def fp8_head_weights_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What brq-convert stores for an FP8 lm_head: (e4m3 [V, d], float32 scales [V])."""
    q, s = fp8_rows_reference(weight)
    return q, s.reshape(-1)


FP8_SPLIT_MIN_EXP = -120  # the smallest power-of-two scale (2^-120) of the FP8 head's input terms


def fp8_pow2_scales(x: torch.Tensor) -> torch.Tensor:
    """float32 [M, 1]: 2^(floor(log2 max|x_row|) - 7), at least 2^-120, built from the bits (a row's
    largest value maps into [128, 256)). A power of two makes q * s and x - q * s exact."""
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    e = ((amax.view(torch.int32) >> 23) - 134).clamp_min(FP8_SPLIT_MIN_EXP)
    return ((e + 127) << 23).view(torch.float32)


def fp8_split_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as two FP8 terms per row, x ~ q_hi s_hi + q_lo s_lo: (e4m3 [2M, K] with the hi rows
    first, float32 power-of-two scales [2M, 1]). q_lo quantizes the exact residual x - q_hi s_hi,
    so the error is FP8's squared (~2^-8 relative) at the cost of a GEMM with twice the rows."""
    xf = x.float()
    s_hi = fp8_pow2_scales(xf)
    hi = (xf * (1 / s_hi)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    r = xf - hi.float() * s_hi
    s_lo = fp8_pow2_scales(r)
    lo = (r * (1 / s_lo)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return torch.cat([hi, lo]), torch.cat([s_hi, s_lo])


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 lm_head: y = (q_hi s_hi + q_lo s_lo)(W8 s_w)^T + b, x split per token into two FP8
    terms (fp8_split_reference), W e4m3 with per-row float32 scales [N]; the e4m3 products are
    exact in float32, the sums run in float32 as on the GPU."""
    x2 = x.reshape(-1, x.shape[-1])
    q, s = fp8_split_reference(x2)
    y2 = (q.float() @ weight.float().t()) * s * weight_scale.float().reshape(1, -1)
    y = y2[: x2.shape[0]] + y2[x2.shape[0]:]
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)
