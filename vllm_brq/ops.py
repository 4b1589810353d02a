"""The BRQ linears as torch.library custom ops (namespace ``brq``).

vLLM traces the model with torch.compile and captures CUDA graphs. Registering the
linears as opaque custom ops with fake (meta) implementations lets Dynamo trace through
them by shape alone, whatever backend ``kernels.dispatch`` picks at run time (Python
reference, Triton), and keeps graph breaks out of the compiled model.

Ops:
- ``brq::mxfp4_linear(x, weight_packed, weight_scale, input_rotation?, bias?, quantize_activations)``:
  y = Q(x R) W^T + b with an MXFP4 weight (calls ``kernels.dispatch.brq_linear``); the
  optional tensors after it (``dispatch.EXTRA_KEYS``: the FP8 weight copy, the +-1 rotation,
  Marlin's weight for W4A16) come from ``dispatch.prepare_extras`` at load time (CUDA fast
  paths; absent on CPU).
- ``brq::rms_norm_mxfp4_linear(x, residual?, norm_weight, eps, <mxfp4_linear's weights>)``:
  (mxfp4_linear(RMSNorm(x + residual)), x + residual): vLLM's (fused-add) RMSNorm and the
  linear after it as one op, which vllm_brq/fusion.py puts in place of the pair in the
  compiled graph (calls ``kernels.dispatch.brq_norm_linear``). Without a residual the
  second output is empty.
- ``brq::silu_mul_mxfp4_linear(gate_up, <mxfp4_linear's weights>)``: mxfp4_linear(silu(gate) * up),
  vLLM's SiluAndMul and the down_proj after it as one op (fusion.py; calls
  ``kernels.dispatch.brq_silu_linear``).
- ``brq::rotated_linear(x, weight, input_rotation?, bias?, quantize_activations)``:
  the same with a dense weight, for ``--quantizer none`` checkpoints (rotated weights in
  the source dtype).
- ``brq::fp8_linear(x, weight, weight_scale, bias?)``: the FP8 lm_head, y = (q_hi s_hi + q_lo s_lo)(W8 s_w)^T + b
  (calls ``kernels.dispatch.fp8_linear``).

Importing this module registers the ops once per process (the Library object lives at
module level: an op lives only as long as its library).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_brq.kernels import dispatch
from vllm_brq.kernels.reference import activation_reference

# FRAGMENT: other modules (e.g. GPU kernels) may add their own ops to the brq namespace.
_LIB = torch.library.Library("brq", "FRAGMENT")

# mxfp4_linear's weights: the checkpoint's, then dispatch.prepare_extras's optional tensors
_WEIGHTS = ("Tensor weight_packed, Tensor weight_scale, Tensor? input_rotation, Tensor? bias, bool quantize_activations, "
            + ", ".join(f"Tensor? {key}=None" for key in dispatch.EXTRA_KEYS))
_LIB.define(f"mxfp4_linear(Tensor x, {_WEIGHTS}) -> Tensor")
_LIB.define(f"rms_norm_mxfp4_linear(Tensor x, Tensor? residual, Tensor norm_weight, float eps, {_WEIGHTS}) "
            "-> (Tensor, Tensor)")
_LIB.define(f"silu_mul_mxfp4_linear(Tensor gate_up, {_WEIGHTS}) -> Tensor")
_LIB.define(
    "rotated_linear(Tensor x, Tensor weight, Tensor? input_rotation, Tensor? bias, "
    "bool quantize_activations) -> Tensor"
)
_LIB.define("fp8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor")


def _rms_norm_mxfp4_linear(x, residual, norm_weight, eps, *linear):
    y, residual_out = dispatch.brq_norm_linear(x, residual, norm_weight, eps, *linear)
    return y, (residual_out if residual_out is not None else x.new_empty(0))


def _rotated_linear(x, weight, input_rotation, bias, quantize_activations):
    xa = activation_reference(x, input_rotation, quantize_activations).to(x.dtype)
    return F.linear(xa, weight, bias)


def _linear_fake(x, weight, *_args):
    """Output shape and dtype only: [..., N] in x's dtype (N = rows of the weight)."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _rms_norm_linear_fake(x, residual, norm_weight, eps, weight, *_args):
    """[..., N] and the residual's shape (empty without a residual), in x's dtype."""
    return _linear_fake(x, weight), x.new_empty(x.shape if residual is not None else (0,))


# CompositeExplicitAutograd: one implementation for every device; the dispatch inside
# chooses the backend. Inference only, so no autograd formula is registered.
_LIB.impl("mxfp4_linear", dispatch.brq_linear, "CompositeExplicitAutograd")
_LIB.impl("rms_norm_mxfp4_linear", _rms_norm_mxfp4_linear, "CompositeExplicitAutograd")
_LIB.impl("silu_mul_mxfp4_linear", dispatch.brq_silu_linear, "CompositeExplicitAutograd")
_LIB.impl("rotated_linear", _rotated_linear, "CompositeExplicitAutograd")
_LIB.impl("fp8_linear", dispatch.fp8_linear, "CompositeExplicitAutograd")
torch.library.register_fake("brq::mxfp4_linear", _linear_fake, lib=_LIB)
torch.library.register_fake("brq::rms_norm_mxfp4_linear", _rms_norm_linear_fake, lib=_LIB)
torch.library.register_fake("brq::silu_mul_mxfp4_linear", _linear_fake, lib=_LIB)
torch.library.register_fake("brq::rotated_linear", _linear_fake, lib=_LIB)
torch.library.register_fake("brq::fp8_linear", _linear_fake, lib=_LIB)

mxfp4_linear = torch.ops.brq.mxfp4_linear
rms_norm_mxfp4_linear = torch.ops.brq.rms_norm_mxfp4_linear
silu_mul_mxfp4_linear = torch.ops.brq.silu_mul_mxfp4_linear
rotated_linear = torch.ops.brq.rotated_linear
fp8_linear = torch.ops.brq.fp8_linear
