"""hf_reference: a BRQ checkpoint in transformers, every decoder linear on the reference spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny_models
from vllm_brq import hf_reference, mxfp4
from vllm_brq.converter import convert
from vllm_brq.converter.pipeline import Options, run
from vllm_brq.kernels.reference import brq_linear_reference
from vllm_brq.rotation import block_rotation

IDS = torch.randint(0, tiny_models.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_models.build("llama_tied", tmp_path_factory.mktemp("src") / "llama")


def test_reference_linear_is_the_spec():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 64, generator=g), torch.randn(24, 64, generator=g)
    packed, scales = mxfp4.quantize(w)
    r = block_rotation(64, 32, 0, "t", shared=True).float()
    b = torch.randn(24, generator=g)
    lin = hf_reference.ReferenceLinear(weight_packed=packed, weight_scale=scales, input_rotation=r, bias=b)
    assert torch.equal(lin(x), brq_linear_reference(x, packed, scales, r, b, True))
    fp = hf_reference.ReferenceLinear(weight=w, input_rotation=r, quantize_activations=False)
    xr = (x.unflatten(-1, (2, 32)) @ r).flatten(-2)
    assert torch.allclose(fp(x), xr @ w.t(), atol=1e-5)


def test_loaded_checkpoint_equals_the_converted_model_in_memory(tmp_path, llama):
    out = convert(llama, tmp_path / "out", quantizer="rtn", device="cpu")
    loaded = hf_reference.load(out)
    assert sum(isinstance(m, hf_reference.ReferenceLinear) for m in loaded.modules()) == 14
    memory = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    run(memory, Options(quantizer="rtn", device="cpu"))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, memory(IDS).logits)


def test_quantizer_none_with_mxfp4_activations_quantizes_every_decoder_linear(tmp_path, llama):
    out = convert(llama, tmp_path / "out", quantizer="none", activations="mxfp4", device="cpu")
    model = hf_reference.load(out)
    linears = [m for m in model.modules() if isinstance(m, hf_reference.ReferenceLinear)]
    assert len(linears) == 14 and all(m.weight is not None and m.quantize_activations for m in linears)
    assert sum(m.input_rotation is not None for m in linears) == 12  # all but o_proj: R4, R1 online (the default)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)(IDS).logits
        got = model(IDS).logits
    err = float((got - want).norm() / want.norm())
    assert 1e-4 < err < 0.5  # activations are rounded, nothing else


def test_fp8_head_is_loaded_as_served_and_must_be_untied(tmp_path, llama):
    """The FP8 head (--lm-head auto, the default) on a tied model: the head is untied and stored FP8;
    the loaded reference equals the converted model in memory; a config that ties it again is
    refused with the reason."""
    import json

    from vllm_brq import format as fmt

    out = convert(llama, tmp_path / "out", quantizer="rtn", device="cpu")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["lm_head_format"] == "fp8"
    loaded = hf_reference.load(out)
    assert isinstance(loaded.lm_head, hf_reference.Fp8Head) and loaded.lm_head.weight.dtype == torch.float8_e4m3fn
    memory = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    run(memory, Options(quantizer="rtn", device="cpu", lm_head="fp8"))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, memory(IDS).logits)
        source = hf_reference.load(convert(llama, tmp_path / "bf16head", quantizer="rtn", device="cpu",
                                           lm_head="source"))(IDS).logits
    err = float((loaded(IDS).logits - source).norm() / source.norm())
    assert 0 < err < 0.05  # the FP8 head moves the logits a little, not more
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(fmt.FormatError, match="FP8 lm_head needs tie_word_embeddings false"):
        hf_reference.load(out)
