"""Plain-torch reference of the BRQ linear: the spec every backend is tested against.

y = Q(x R) Q(W)^T + b, where R is the optional online input rotation (per b-block), Q
is MXFP4 fake quantization (activations only when the checkpoint is W4A4) and the weight
arrives packed. Computed in float32, returned in x's dtype.
"""

from __future__ import annotations

import torch

from vllm_brq import mxfp4
from vllm_brq.rotation import rotate


def quantize_activation_reference(x: torch.Tensor, input_rotation: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (packed codes [M, K/2], E8M0 scales [M, K/32]) after the optional rotation."""
    xf = x.float()
    if input_rotation is not None:
        xf = rotate(xf, input_rotation.float())
    return mxfp4.quantize(xf)


def brq_linear_reference(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    input_rotation: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    quantize_activations: bool = True,
) -> torch.Tensor:
    """x [..., K] -> [..., N] with the MXFP4 weight (packed [N, K/2], scales [N, K/32])."""
    xf = x.float()
    if input_rotation is not None:
        xf = rotate(xf, input_rotation.float())
    if quantize_activations:
        xf = mxfp4.fake_quantize(xf)
    w = mxfp4.dequantize(weight_packed, weight_scale, torch.float32)
    y = xf @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
