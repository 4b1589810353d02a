"""The "brq" QuantizationConfig: registration, detection from config.json, config errors.

Config errors must surface before any engine starts, naming the offending key."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm_brq import format as fmt  # noqa: E402
from vllm_brq import plugin  # noqa: E402

from plugin_checkpoints import quantization_config  # noqa: E402


@pytest.fixture(scope="module")
def config_cls():
    plugin.register()
    from vllm.model_executor.layers.quantization import get_quantization_config

    return get_quantization_config("brq")


def test_register_is_idempotent(config_cls):
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED

    plugin.register()
    plugin.register()
    assert QUANTIZATION_METHODS.count("brq") == 1
    assert config_cls.get_name() == "brq"
    assert {"BRQLinearMethod", "BRQDenseLinearMethod"} <= set(WEIGHT_LOADER_V2_SUPPORTED)


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("brq") == "vllm_brq.plugin:register"


def test_from_config(config_cls):
    cfg = config_cls.from_config(quantization_config())
    assert cfg.brq.quantize_activations and cfg.brq.weights_quantized
    assert config_cls.from_config(quantization_config("none")).brq.quantize_activations is False


@pytest.mark.parametrize("change, key", [
    ({"format_version": 3}, "format_version"),
    ({"activation_format": "int4"}, "activation_format"),
    ({"format_version": None}, "format_version"),
    ({"weight_format": "nvfp4"}, "weight_format"),
    ({"group_size": 16}, "group_size"),
    ({"rotation": {"kind": "block_hadamard", "block_size": 48}}, "rotation.block_size"),
    ({"rotation": {"kind": "block_hadamard", "block_size": 0}}, "rotation.block_size"),
    ({"quantizer": {"method": "awq"}}, "quantizer.method"),
])
def test_bad_config_names_the_key(config_cls, change, key):
    with pytest.raises(fmt.FormatError, match=key.replace(".", r"\.")):
        config_cls.from_config(quantization_config(**change))


def test_override_detects_brq_checkpoints(config_cls):
    assert config_cls.override_quantization_method(quantization_config(), None) == "brq"
    assert config_cls.override_quantization_method(quantization_config(), "brq") == "brq"
    assert config_cls.override_quantization_method({"quant_method": "fp8"}, None) is None
    with pytest.raises(fmt.FormatError, match="format_version"):
        config_cls.override_quantization_method(quantization_config(format_version=99), None)


def test_ignore_follows_fused_layers(config_cls):
    cfg = config_cls.from_config(quantization_config(ignore=["lm_head", "model.layers.0.mlp.gate_proj",
                                                            "model.layers.0.mlp.up_proj", "layers.1.self_attn.q_proj"]))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert cfg.is_ignored("lm_head")
    assert cfg.is_ignored("model.layers.0.mlp.gate_up_proj")
    assert not cfg.is_ignored("model.layers.0.mlp.down_proj")
    with pytest.raises(fmt.FormatError, match="fuses"):
        cfg.is_ignored("model.layers.1.self_attn.qkv_proj")


def test_plain_model_config_detects_brq(tmp_path, smollm2_dir):
    """`vllm serve OUT` without --quantization: vLLM's own config resolution picks brq,
    and a bad key fails there, in the front-end process."""
    from vllm.config import ModelConfig

    import plugin_checkpoints as pc

    src = pc.tiny_llama(tmp_path / "tiny", smollm2_dir)
    out = pc.brq_checkpoint(src, tmp_path / "brq")
    assert ModelConfig(model=str(out)).quantization == "brq"
    bad = quantization_config()
    bad["activation_format"] = "fp8"
    pc.set_quantization_config(out, bad)
    with pytest.raises(Exception, match="activation_format"):
        ModelConfig(model=str(out))
