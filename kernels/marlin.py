"""vLLM's MXFP4 Marlin GEMM as a backend of the BRQ linear (CUDA, where vLLM's ops load).

Marlin (IST-DASLab's mixed-precision GEMM, in vLLM as `marlin_gemm`) multiplies 16-bit
activations by 4-bit weights it dequantizes in registers; it is how vLLM itself serves MXFP4
(compressed-tensors `mxfp4-pack-quantized`) on GPUs without FP4 tensor cores. A BRQ
checkpoint's weights are in that layout (low nibble first, uint8 E8M0 scales per 32), so
vLLM's own preparation applies unchanged. The weight Marlin dequantizes is exact (E2M1 * 2^s
in 16 bits), products are exact and sums float32: the W4A16 product of the reference up to
summation order; fed the act-quant's exact MXFP4 values (MODE_DEQUANT), the W4A4 product.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether vLLM's MXFP4 Marlin loads here (a CUDA build of vLLM on a GPU it supports)."""
    if not torch.cuda.is_available():
        return False
    try:
        from vllm.model_executor.layers.quantization.utils import marlin_utils_fp4 as mu

        return bool(mu.is_fp4_marlin_supported()) and hasattr(torch.ops._C, "marlin_gemm")
    except Exception as exc:  # pragma: no cover - depends on the install
        logger.debug("vLLM's MXFP4 Marlin unavailable: %r", exc)
        return False


def prepare(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
            bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Packed MXFP4 [N, K/2] + E8M0 [N, K/32] (+ bias [N]) -> Marlin's tensors: 'marlin_weight',
    'marlin_scale', 'marlin_workspace' (+ 'marlin_bias'), by vLLM's `prepare_fp4_layer_for_marlin`
    on a stand-in layer (it reads these attributes only). For bf16 activations (vLLM 0.24's Marlin
    has no fp16 x MXFP4 kernel); the scales pass through bf16 on the way, exact for every E8M0 value."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import prepare_fp4_layer_for_marlin

    N, K = weight_packed.shape[0], weight_packed.shape[1] * 2
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight_packed, requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(weight_scale, requires_grad=False)
    layer.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None
    layer.output_size_per_partition, layer.input_size_per_partition, layer.params_dtype = N, K, torch.bfloat16
    prepare_fp4_layer_for_marlin(layer)
    out = {"marlin_weight": layer.weight.data, "marlin_scale": layer.weight_scale.data,
           "marlin_workspace": layer.workspace}
    if layer.bias is not None:
        out["marlin_bias"] = layer.bias.data
    return out


def linear(x: torch.Tensor, N: int, K: int, marlin_weight: torch.Tensor, marlin_scale: torch.Tensor,
           marlin_workspace: torch.Tensor, marlin_bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16) x the prepared MXFP4 weight -> [M, N] bf16 (+ the bias given to prepare)."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import apply_fp4_marlin_linear

    return apply_fp4_marlin_linear(input=x, weight=marlin_weight, weight_scale=marlin_scale,
                                   weight_global_scale=None, workspace=marlin_workspace, size_n=N, size_k=K,
                                   bias=marlin_bias)
