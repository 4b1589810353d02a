"""The written checkpoint: format v1 tensors and config, files, model card, determinism, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_models
from vllm_brq import format as fmt
from vllm_brq import hf_reference, mxfp4
from vllm_brq.converter import convert
from vllm_brq.converter.architectures import LINEARS
from vllm_brq.rotation import hadamard
from vllm_brq.converter.cli import main

CALIB = dict(nsamples=4, seqlen=64, device="cpu")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, smollm2_dir) -> Path:
    return tiny_models.build("qwen2", tmp_path_factory.mktemp("src") / "qwen2", smollm2_dir)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_gptq_checkpoint_follows_the_format(tmp_path, qwen2, austen_dir):
    out = convert(qwen2, tmp_path / "out", calib_file=str(austen_dir / "persuasion.txt"), scale_search=True, **CALIB)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(_files(out))
    cfg = json.loads((out / "config.json").read_text())
    q = fmt.parse_config(cfg["quantization_config"])
    assert q.quantizer["method"] == "gptq" and q.quantizer["scale_search"] is True
    assert q.quantizer["calibration"] == {"source": "file persuasion.txt", "nsamples": 4, "seqlen": 64}
    assert q.rotation == {"kind": "block_hadamard", "block_size": 32, "seed": 0, "r1": True, "r1_mode": "online",
                          "r2": True, "r4": True}
    tensors = load_file(out / "model.safetensors")
    for layer in range(cfg["num_hidden_layers"]):
        for name in LINEARS:
            prefix = f"model.layers.{layer}.{name}"
            parts = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == prefix}
            out_f = parts[fmt.WEIGHT_SCALE].shape[0]
            fmt.check_linear_tensors(prefix, parts, out_f, parts[fmt.WEIGHT_PACKED].shape[1] * 2)
            assert ("bias" in parts) == name.endswith(("q_proj", "k_proj", "v_proj"))
            if name == "self_attn.o_proj":  # R2 is folded into v and o
                assert fmt.INPUT_ROTATION not in parts
            else:  # R4 (down_proj) and R1 online (q/k/v, gate/up): the random signs live in up_proj's
                # rows and in the norm weights, so online each is the plain Hadamard
                assert parts[fmt.INPUT_ROTATION].shape == (32, 32) and parts[fmt.INPUT_ROTATION].dtype == torch.float32
                assert torch.equal(parts[fmt.INPUT_ROTATION], hadamard(32, torch.float32))
    # R1 online fuses no norm: the gains stay (times R1's signs), the final norm too
    src_norms = load_file(next(qwen2.glob("*.safetensors")))
    for key in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(tensors[key].abs(), src_norms[key].abs()), key
    # the default FP8 head (format version 2), quantized by GPTQ on the final norm's outputs
    assert cfg["quantization_config"]["format_version"] == 2 and q.lm_head_format == "fp8"
    assert tensors["lm_head.weight"].dtype == torch.float8_e4m3fn and tensors["lm_head.weight_scale"].dtype == torch.float32
    assert (out.stat().st_mode & 0o077) == (0o777 & ~_umask() & 0o077)  # not mkdtemp's private mode
    assert ((out / "model.safetensors").stat().st_mode & 0o044) == (0o666 & ~_umask() & 0o044)
    card = (out / "README.md").read_text()
    assert "brq-convert" in card and "persuasion.txt" in card and "--scale-search" in card
    assert "lm_head: FP8 e4m3 with a scale per row, quantized by GPTQ on the calibration data" in card


def test_same_inputs_give_byte_identical_checkpoints(tmp_path, qwen2, austen_dir):
    out = tmp_path / "out"
    options = dict(calib_file=str(austen_dir / "persuasion.txt"), **CALIB)
    first = _files(convert(qwen2, out, **options))
    second = _files(convert(qwen2, out, overwrite=True, **options))
    assert first == second
    third = _files(convert(qwen2, out, overwrite=True, **dict(options, seed=1)))
    assert third["model.safetensors"] != first["model.safetensors"]


def test_gptq_model_stays_close_to_the_original(tmp_path, qwen2, austen_dir):
    """W4A16 GPTQ on a tiny random model: logits move, but stay correlated with the original."""
    out = convert(qwen2, tmp_path / "out", calib_file=str(austen_dir / "persuasion.txt"),
                  activations="none", **CALIB)
    ids = torch.randint(0, tiny_models.VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(qwen2, dtype=torch.float32)(ids).logits
        got = hf_reference.load(out)(ids).logits
    assert float((got - want).norm() / want.norm()) < 0.6


def test_cli_rtn_without_rotation(tmp_path, qwen2, capsys):
    out = tmp_path / "out"
    assert main([str(qwen2), str(out), "--quantizer", "rtn", "--rotation", "none", "--device", "cpu"]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["rotation"]["kind"] == "none" and cfg["quantizer"] == {"method": "rtn"}
    tensors = load_file(out / "model.safetensors")
    w = load_file(qwen2 / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    g = load_file(qwen2 / "model.safetensors")["model.layers.0.post_attention_layernorm.weight"]
    got = mxfp4.dequantize(tensors["model.layers.0.mlp.up_proj.weight_packed"],
                           tensors["model.layers.0.mlp.up_proj.weight_scale"])
    assert torch.equal(got, mxfp4.fake_quantize(w * g))  # norm fused, then round to nearest
    assert not any(k.endswith(fmt.INPUT_ROTATION) for k in tensors)
    assert "brq-convert " + str(qwen2) in (out / "README.md").read_text()
