"""Checkpoint format (v1, v2 with the FP8 lm_head): config validation and per-linear tensor checks name what is wrong."""

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
        ({"format_version": 3}, "format_version = 3 is unknown"),
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


def test_fp8_head_config_is_version_2():
    """A writer stays on version 1 unless the lm_head is FP8 (older readers load the rest)."""
    cfg = fmt.build_config(activation_format="mxfp4", rotation=_cfg()["rotation"], quantizer={"method": "rtn"},
                           converter="vllm-brq test", lm_head_format="fp8")
    assert cfg["format_version"] == 2 and cfg["ignore"] == [] and cfg["lm_head_format"] == "fp8"
    assert fmt.parse_config(cfg).lm_head_format == "fp8"
    assert fmt.parse_config(_cfg()).lm_head_format == "source" and _cfg()["format_version"] == 1


@pytest.mark.parametrize("over, match", [
    ({"format_version": 1, "ignore": [], "lm_head_format": "fp8"}, "needs format_version 2"),
    ({"format_version": 2, "ignore": ["lm_head"], "lm_head_format": "fp8"}, "contradicts lm_head_format"),
    ({"format_version": 2, "ignore": []}, "contradicts lm_head_format = 'source'"),
    ({"format_version": 2, "ignore": [], "lm_head_format": "int8"}, "lm_head_format = 'int8' is not supported"),
])
def test_bad_fp8_head_config_names_the_key(over, match):
    with pytest.raises(fmt.FormatError, match=match):
        fmt.parse_config(_cfg(**over))


def test_fp8_head_tensor_checks():
    specs = fmt.fp8_head_tensor_specs(64, 96)
    good = {"weight": torch.zeros(64, 96, dtype=torch.float8_e4m3fn), "weight_scale": torch.ones(64)}
    fmt.check_tensors("lm_head", good, specs)
    with pytest.raises(fmt.FormatError, match="missing tensor lm_head.weight_scale"):
        fmt.check_tensors("lm_head", {"weight": good["weight"]}, specs)
    with pytest.raises(fmt.FormatError, match="lm_head.weight has dtype torch.bfloat16, expected float8_e4m3fn"):
        fmt.check_tensors("lm_head", {**good, "weight": torch.zeros(64, 96, dtype=torch.bfloat16)}, specs)
    with pytest.raises(fmt.FormatError, match=r"lm_head.weight_scale has shape \[64, 1\]"):
        fmt.check_tensors("lm_head", {**good, "weight_scale": torch.ones(64, 1)}, specs)
