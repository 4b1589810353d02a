"""The brq torch.library ops: same numbers as the reference linear, opaque to torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from vllm_brq import mxfp4, ops
from vllm_brq.kernels.reference import brq_linear_reference
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


def test_opcheck(weights):
    """Schema and fake (meta) implementation agree with the real op."""
    w, packed, scale, bias, x = weights
    for op, args in ((torch.ops.brq.mxfp4_linear.default, (x, packed, scale, ROTATIONS["shared"], bias, True)),
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
