"""Properties of the MXFP4 reference numerics (vllm_brq.mxfp4): the spec everything meets."""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm_brq import mxfp4

GRID = torch.tensor(mxfp4.E2M1_VALUES)


def _block(values, scale_exp: int = 0) -> torch.Tensor:
    """One 32-block: ``values`` padded with zeros, times 2^scale_exp, with a 6 forcing the scale."""
    v = torch.zeros(32)
    v[0] = 6.0
    v[1: 1 + len(values)] = torch.tensor(values, dtype=torch.float32)
    return v * 2.0**scale_exp


@pytest.mark.parametrize("e", [-127 + 2, -20, -1, 0, 3, 40, 125])
def test_representable_values_round_trip_exactly(e):
    signed = torch.cat([GRID, -GRID])
    codes = torch.tensor(list(itertools.islice(itertools.cycle(range(16)), 64)))
    x = torch.stack([_block(signed[codes[:31]].tolist(), e), _block(signed[codes[31:62]].tolist(), e)])
    packed, scales = mxfp4.quantize(x)
    assert packed.shape == (2, 16) and scales.shape == (2, 1) and packed.dtype == scales.dtype == torch.uint8
    assert torch.equal(mxfp4.dequantize(packed, scales), x)
    assert torch.equal(mxfp4.fake_quantize(x), x)
    assert scales.eq(e + 127).all()


def test_scale_is_floor_log2_amax_minus_two():
    x = torch.zeros(3, 32)
    x[0, 0], x[1, 0], x[2, 0] = 4.0, 7.99, 8.0
    assert mxfp4.block_exponents(x).flatten().tolist() == [0, 0, 1]


@pytest.mark.parametrize("value,expected", [
    (0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),  # ties to even
    (0.26, 0.5), (2.51, 3.0), (4.99, 4.0), (5.01, 6.0),  # nearest
    (-0.75, -1.0), (-5.0, -4.0), (-2.5, -2.0),
])
def test_ties_to_even(value, expected):
    got = mxfp4.fake_quantize(_block([value]))[1]
    assert got.item() == expected


def test_saturation_at_six():
    # amax 7.9 -> scale 2^0 -> 7.9 and 6.5 saturate to 6; negative too
    x = torch.zeros(32)
    x[:3] = torch.tensor([7.9, 6.5, -7.5])
    assert mxfp4.fake_quantize(x)[:3].tolist() == [6.0, 6.0, -6.0]
    assert mxfp4.round_to_e2m1(torch.tensor([100.0, -1e30])).tolist() == [6.0, -6.0]


def test_zero_block_gets_smallest_scale_and_round_trips():
    packed, scales = mxfp4.quantize(torch.zeros(2, 64))
    assert scales.eq(0).all() and packed.eq(0).all()
    assert mxfp4.dequantize(packed, scales).eq(0).all()


def test_negative_zero_is_code_zero():
    codes, _ = mxfp4.quantize_codes(torch.full((32,), -0.0))
    assert codes.eq(0).all()


def test_subnormal_range_blocks():
    tiny = torch.finfo(torch.float32).tiny  # 2^-126
    x = torch.zeros(32)
    x[:4] = torch.tensor([tiny, -tiny / 2, tiny / 4, 2.0**-149])  # float32 subnormals
    e = mxfp4.block_exponents(x)
    assert e.item() == -127  # floor(log2 2^-126) - 2 = -128, clamped
    y = mxfp4.fake_quantize(x)
    assert torch.isfinite(y).all()
    # with X = 2^-127: 2^-126 -> 2, -2^-127 -> -1, 2^-128 -> 0.5, 2^-149 -> 0
    assert y[:4].tolist() == [tiny, -tiny / 2, tiny / 4, 0.0]
    packed, scales = mxfp4.quantize(x)
    assert torch.equal(mxfp4.dequantize(packed, scales), y)


def test_scale_clamped_at_the_top():
    big = torch.zeros(32)
    big[0] = torch.finfo(torch.float32).max  # floor(log2) = 127 -> e = 125, within range
    assert mxfp4.block_exponents(big).item() == 125
    assert mxfp4.fake_quantize(big)[0].item() == 6.0 * 2.0**125


def test_scale_clamped_at_the_top_beyond_float32():
    huge = torch.zeros(32, dtype=torch.float64)
    huge[0] = 2.0**200
    assert mxfp4.block_exponents(huge).item() == 127
    assert mxfp4.block_exponents(huge.float()).item() == 127  # inf in float32


def test_packing_order_low_nibble_first():
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)
    packed = mxfp4.pack(codes)
    assert packed[0].item() == 0 | 1 << 4 and packed[7].item() == 14 | 15 << 4
    assert torch.equal(mxfp4.unpack(packed), codes)


def test_quantize_matches_fake_quantize_on_random_data():
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 256)
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(x)), mxfp4.fake_quantize(x))


def test_scale_255_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        mxfp4.dequantize(torch.zeros(1, 16, dtype=torch.uint8), torch.full((1, 1), 255, dtype=torch.uint8))
