"""Checkpoint format v1: config validation and per-linear tensor checks name what is wrong."""

from __future__ import annotations

import pytest
import torch

from vllm_brq import format as fmt


def _cfg(**over):
    cfg = fmt.build_config(
        activation_format="mxfp4",
        rotation={"kind": "block_hadamard", "block_size": 32, "seed": 0, "r1": True, "r2": True, "r4": True},
        quantizer={"method": "gptq"},
        converter="vllm-brq test",
    )
    cfg.update(over)
    return cfg


def test_build_and_parse_round_trip():
    parsed = fmt.parse_config(_cfg())
    assert parsed.quantize_activations and parsed.weights_quantized
    assert parsed.ignore == ("lm_head",)
    assert not fmt.parse_config(_cfg(activation_format="none")).quantize_activations


@pytest.mark.parametrize(
    "over, match",
    [
        ({"format_version": 2}, "format_version = 2 is unknown"),
        ({"activation_format": "nvfp4"}, "activation_format = 'nvfp4' is not supported"),
        ({"weight_format": "int4"}, "weight_format"),
        ({"group_size": 16}, "group_size"),
        ({"quant_method": "fp_quant"}, "quant_method"),
        ({"rotation": {"kind": "spin", "block_size": 32}}, "rotation.kind"),
        ({"rotation": {"kind": "block_hadamard", "block_size": 0}}, "block_size"),
        ({"quantizer": {"method": "awq"}}, "quantizer.method"),
    ],
)
def test_bad_config_names_the_key(over, match):
    with pytest.raises(fmt.FormatError, match=match):
        fmt.parse_config(_cfg(**over))


def test_missing_key_is_named():
    cfg = _cfg()
    del cfg["rotation"]
    with pytest.raises(fmt.FormatError, match="no 'rotation' key"):
        fmt.parse_config(cfg)


def test_linear_tensor_checks():
    good = {
        "weight_packed": torch.zeros(64, 48, dtype=torch.uint8),
        "weight_scale": torch.zeros(64, 3, dtype=torch.uint8),
        "input_rotation": torch.zeros(32, 32),
    }
    fmt.check_linear_tensors("m.down_proj", good, 64, 96)
    with pytest.raises(fmt.FormatError, match="missing tensor m.down_proj.weight_scale"):
        fmt.check_linear_tensors("m.down_proj", {"weight_packed": good["weight_packed"]}, 64, 96)
    with pytest.raises(fmt.FormatError, match=r"m.down_proj.weight_packed has shape \[64, 40\]"):
        fmt.check_linear_tensors("m.down_proj", {**good, "weight_packed": torch.zeros(64, 40, dtype=torch.uint8)}, 64, 96)
    with pytest.raises(fmt.FormatError, match="dtype"):
        fmt.check_linear_tensors("m.down_proj", {**good, "weight_scale": torch.zeros(64, 3)}, 64, 96)
    with pytest.raises(fmt.FormatError, match="input_rotation"):
        fmt.check_linear_tensors("m.down_proj", {**good, "input_rotation": torch.zeros(3, 16, 16)}, 64, 96)
    with pytest.raises(fmt.FormatError, match="not divisible"):
        fmt.linear_tensor_specs(64, 100)
    assert fmt.check_rotation_shape("x", (3, 32, 32), 96) == 32
    assert fmt.check_rotation_shape("x", (96, 96), 96) == 96
