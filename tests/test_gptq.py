"""GPTQ onto MXFP4 (and FP8 rows): the algorithm on synthetic data, then GPTQ vs RTN on real SmolLM2 layers."""

from __future__ import annotations

import pytest
import torch

from vllm_brq import mxfp4
from vllm_brq.converter.gptq import GPTQ
from vllm_brq.converter.pipeline import Options, run


def _correlated(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return torch.randn(n, k, generator=g) @ mix * torch.linspace(0.2, 3, k)


def _gptq(x: torch.Tensor, **kw) -> GPTQ:
    q = GPTQ(x.shape[1], **kw)
    for part in x.split(100):
        q.add_batch(part)
    return q


def test_gptq_lowers_output_error_and_stays_on_static_groups():
    x = _correlated(1024, 128)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    g = _gptq(x)
    q = g.quantize(w)
    err_q, ref = g.output_sq_error(w, q)
    err_rtn, _ = g.output_sq_error(w, mxfp4.fake_quantize(w))
    assert err_q.sum() < 0.8 * err_rtn.sum()
    # every value is an E2M1 value times its group's static exponent (from W, before GPTQ)
    scale = torch.exp2(mxfp4.block_exponents(w).float()).repeat_interleave(32, 1)
    assert torch.equal(mxfp4.round_to_e2m1(q / scale) * scale, q)
    # and the packed form reproduces it exactly
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(q)), q)


def test_gptq_onto_fp8_rows_lowers_output_error_on_fixed_row_scales():
    """The FP8 lm_head's grid: e4m3 values times each row's max / 448, fixed before GPTQ."""
    from vllm_brq.kernels.reference import fp8_head_weights_reference, fp8_row_scales

    x = _correlated(1024, 128, seed=2)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    w[0, 7] = 40.0  # an outlier row: its scale is set by it
    g = _gptq(x, grid="fp8_rows")
    q = g.quantize(w)
    codes, s = fp8_head_weights_reference(w)
    err_q, _ = g.output_sq_error(w, q)
    err_rtn, _ = g.output_sq_error(w, codes.float() * s[:, None])
    assert err_q.sum() < 0.8 * err_rtn.sum()
    scale = fp8_row_scales(w)
    assert torch.equal((q / scale).to(torch.float8_e4m3fn).float() * scale, q)  # on the grid, exactly
    with pytest.raises(ValueError, match="unknown GPTQ grid"):
        GPTQ(8, grid="int4")


def test_hessian_is_the_mean_outer_product():
    x = _correlated(300, 64)
    assert torch.allclose(_gptq(x).hessian, x.t() @ x / 300, rtol=1e-5, atol=1e-5)


def test_dead_columns_quantize_to_zero():
    x = _correlated(512, 64)
    x[:, 5] = 0
    q = _gptq(x).quantize(torch.randn(8, 64))
    assert q[:, 5].eq(0).all()


def test_scale_search_never_increases_the_weighted_group_error():
    x = _correlated(512, 64)
    w = torch.randn(32, 64) * torch.rand(32, 64) ** 4  # peaky groups, where a smaller scale helps
    g = _gptq(x, scale_search=True)
    hd = torch.diagonal(g.hessian)
    e0, e1 = mxfp4.block_exponents(w), g.exponents(w, hd)
    assert (e1 - e0).abs().max() <= 1 and (e1 != e0).any()

    def err(e):
        s = torch.exp2(e.float()).repeat_interleave(32, 1)
        return ((w - mxfp4.round_to_e2m1(w / s) * s) ** 2 * hd).unflatten(1, (-1, 32)).sum(-1)

    assert (err(e1) <= err(e0)).all()


def test_act_order_is_deterministic():
    x = _correlated(512, 64)
    w = torch.randn(16, 64)
    assert torch.equal(_gptq(x).quantize(w), _gptq(x).quantize(w))


@pytest.mark.slow
@pytest.mark.parametrize("rotation", ["block", "none"])
def test_gptq_beats_rtn_on_smollm2_layers(smollm2_dir, austen_dir, rotation):
    """||X W^T - X Q^T|| of GPTQ < RTN for every linear of the first two SmolLM2 layers,
    X the inputs each linear sees in the (partly) quantized W4A4 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    opts = Options(rotation=rotation, calib_file=str(austen_dir / "calibration.txt"),
                   nsamples=8, seqlen=256, device="cpu")
    report = run(model, opts, AutoTokenizer.from_pretrained(smollm2_dir), max_layers=2)
    assert len(report.stats) == 14
    for s in report.stats:
        assert s.output_q < s.output_rtn, s
