"""The brq torch.library ops: same numbers as the reference linear, opaque to torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from vllm_brq import mxfp4, ops
from vllm_brq.kernels.reference import brq_linear_reference, rms_norm_reference
from vllm_brq.rotation import block_rotation, rotate

K, N = 128, 48


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    packed, scale = mxfp4.quantize(w)
    return w, packed, scale, torch.randn(N, generator=g), torch.randn(5, K, generator=g)


ROTATIONS = {
    "none": None,
    "shared": block_rotation(K, 32, 0, "t", shared=True).float(),
    "per_block": block_rotation(K, 32, 0, "t").float(),
}


@pytest.mark.parametrize("rotation", list(ROTATIONS))
@pytest.mark.parametrize("quantize_activations", [True, False])
def test_mxfp4_linear_is_the_reference(weights, rotation, quantize_activations):
    _, packed, scale, bias, x = weights
    r = ROTATIONS[rotation]
    want = brq_linear_reference(x, packed, scale, r, bias, quantize_activations)
    got = ops.mxfp4_linear(x, packed, scale, r, bias, quantize_activations)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("quantize_activations", [True, False])
def test_rotated_linear(weights, quantize_activations):
    w, _, _, bias, x = weights
    r = ROTATIONS["shared"]
    xr = rotate(x, r)
    if quantize_activations:
        xr = mxfp4.fake_quantize(xr)
    torch.testing.assert_close(ops.rotated_linear(x, w, r, bias, quantize_activations), xr @ w.t() + bias)
    torch.testing.assert_close(ops.rotated_linear(x, w, None, None, False), x @ w.t())


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_mxfp4_linear_is_norm_then_linear(weights, with_residual, dtype):
    """The norm-fused op (what vllm_brq/fusion.py puts in the graph) = vLLM's IR RMSNorm
    (rms_norm_reference) followed by the reference linear, residual stream included."""
    _, packed, scale, bias, x = weights
    g = torch.Generator().manual_seed(1)
    x = (x * 3).to(dtype)
    res = torch.randn(x.shape, generator=g).to(dtype) if with_residual else None
    nw = (torch.rand(K, generator=g) + 0.5).to(dtype)
    normed, res_out = rms_norm_reference(x, res, nw, 1e-5)
    y, r = ops.rms_norm_mxfp4_linear(x, res, nw, 1e-5, packed, scale, None, bias, True)
    torch.testing.assert_close(y, brq_linear_reference(normed, packed, scale, None, bias, True), rtol=0, atol=0)
    if with_residual:
        torch.testing.assert_close(r, (x.float() + res.float()).to(dtype), rtol=0, atol=0)
    else:
        assert r.numel() == 0


def test_rms_norm_reference_rounds_as_vllm_ir():
    """The IR op rounds twice (the normalized value to the weight's dtype, then the product)."""
    x = torch.tensor([[1.0, 3.0, -2.0, 7.0]], dtype=torch.bfloat16)
    w = torch.tensor([1.5, 0.75, 3.0, 1.0], dtype=torch.bfloat16)
    h = x.float()
    want = ((h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * w).bfloat16()
    assert torch.equal(rms_norm_reference(x, None, w, 1e-6)[0], want)


def test_opcheck(weights):
    """Schema and fake (meta) implementation agree with the real op."""
    w, packed, scale, bias, x = weights
    nw = torch.rand(K) + 0.5
    for op, args in ((torch.ops.brq.mxfp4_linear.default, (x, packed, scale, ROTATIONS["shared"], bias, True)),
                     (torch.ops.brq.rms_norm_mxfp4_linear.default, (x, x * 2, nw, 1e-5, packed, scale, None, bias,
                                                                     True)),
                     (torch.ops.brq.rms_norm_mxfp4_linear.default, (x, None, nw, 1e-5, packed, scale, None, None,
                                                                     True)),
                     (torch.ops.brq.silu_mul_mxfp4_linear.default, (torch.cat([x, x], 1)[:, :K * 2], packed, scale,
                                                                    ROTATIONS["shared"], bias, True)),
                     (torch.ops.brq.rotated_linear.default, (x, w, None, bias, False))):
        opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_breaks(weights):
    """fullgraph=True fails on any graph break: the op must be opaque to Dynamo."""
    _, packed, scale, bias, x = weights
    r = ROTATIONS["per_block"]

    def f(x):
        return torch.relu(ops.mxfp4_linear(x, packed, scale, r, bias, True)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x), f(x))
    torch.testing.assert_close(compiled(x[:3]), f(x[:3]))


def test_fp8_linear_is_the_reference_and_checks_out():
    """brq::fp8_linear (the FP8 lm_head) on CPU is fp8_linear_reference; schema and fake agree."""
    from vllm_brq.kernels.reference import fp8_head_weights_reference, fp8_linear_reference

    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(96, K, generator=g), torch.randn(3, K, generator=g).bfloat16()
    w8, ws = fp8_head_weights_reference(w)
    y = torch.ops.brq.fp8_linear(x, w8, ws, None)
    assert torch.equal(y, fp8_linear_reference(x, w8, ws))
    ref = (x.double() @ w.double().t())
    assert y.dtype == torch.bfloat16 and float((y.double() - ref).norm() / ref.norm()) < 0.05
    # test_schema compares inputs with arithmetic that e4m3 tensors lack on CPU; the fake is what matters
    opcheck(torch.ops.brq.fp8_linear.default, (x, w8, ws, None), test_utils=("test_faketensor",))
