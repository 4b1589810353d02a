"""--quantizer none only fuses norms and rotates: the served model must equal the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny_models
from vllm_brq import hf_reference
from vllm_brq.converter import convert

CASES = [
    ("llama", {}),
    ("qwen2", {}),  # q/k/v biases: the v bias follows R2
    ("llama_tied", {}),  # R1 online fuses no norm: lm_head stays tied
    ("qwen3", {}),  # q_norm / k_norm
    ("mistral", {}),
    ("llama", {"rotation": "global"}),
    ("llama", {"rotation_block_size": 16, "seed": 3}),
    ("llama", {"r1": False}),
    # the default R1 online keeps the norm gains (times R1's signs) and rotates q/k/v/gate/up's input;
    # R1 fused folds the gains into the weights and R1 into the residual stream
    ("llama", {"r1_mode": "fused"}),
    ("qwen2", {"r1_mode": "fused"}),
    ("llama_tied", {"r1_mode": "fused"}),  # final norm != 1 fused into lm_head: untied
    ("qwen3", {"r1_mode": "online", "rotation_block_size": 16}),
    ("llama", {"rotation": "global", "r1_mode": "online"}),  # a dense online R1
]


@pytest.mark.parametrize("kind,options", CASES, ids=[f"{k}-{'-'.join(map(str, o.values())) or 'block'}" for k, o in CASES])
def test_rotated_model_gives_original_logits(tmp_path: Path, kind: str, options: dict):
    src = tiny_models.build(kind, tmp_path / "src")
    ids = torch.randint(0, tiny_models.VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
    out = convert(src, tmp_path / "out", quantizer="none", activations="none", device="cpu", **options)
    model = hf_reference.load(out)
    with torch.no_grad():
        got = model(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quantizer"]["method"] == "none"
    mode = options.get("r1_mode", "auto")
    if mode == "auto":  # the default: R1 online with the block rotation, fused with the global one
        mode = "online" if options.get("rotation", "block") == "block" else "fused"
    online = options.get("r1", True) and mode == "online"
    assert cfg["quantization_config"]["rotation"]["r1_mode"] == ("online" if online else "fused")
    # untied sources, or tied with a final norm != 1 fused into lm_head (R1 online fuses no norm)
    assert cfg["tie_word_embeddings"] is bool(online and kind == "llama_tied")


def test_tied_embeddings_stay_tied_when_final_norm_is_one(tmp_path: Path):
    src = tiny_models.build("llama_tied", tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.fill_(1)
    model.save_pretrained(src)
    out = convert(src, tmp_path / "out", quantizer="none", activations="none", device="cpu")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    ids = torch.randint(0, tiny_models.VOCAB, (1, 16))
    with torch.no_grad():
        want, got = model(ids).logits, hf_reference.load(out)(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-4


def test_r4_signs_split_off_only_from_a_randomized_hadamard():
    from vllm_brq.converter.fuse import split_signs
    from vllm_brq.rotation import block_rotation, global_rotation, hadamard

    r = block_rotation(64, 32, 5, "r4", shared=True)
    s, plain = split_signs(r)
    assert torch.equal(plain, hadamard(32)) and torch.equal(s[:, None] * plain, r) and bool((s < 0).any())
    haar = global_rotation(48, 5, "r4")  # not a power of two: Haar-random, nothing to split
    assert split_signs(haar)[0] is None and split_signs(haar)[1] is haar


def test_layer_transform_keeps_every_tensor_on_the_weights_device():
    """brq-convert --device cuda builds the rotations on the CPU and moves each layer to the GPU:
    every fold must follow the weights (a GPU conversion once crashed folding R4's signs).
    The meta device stands in for the GPU: it refuses CPU operands the same way."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from vllm_brq.converter.architectures import dims
    from vllm_brq.converter.fuse import build_rotations, transform_layer

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=tiny_models.VOCAB)
    d = dims(cfg)
    rot = build_rotations("block", d, 32, 0, True, True, True)
    assert rot.r4_signs is not None and rot.r4_signs.device.type == "cpu"
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, 0)
    transform_layer(layer, rot, d)
    assert {p.device.type for p in layer.parameters()} == {"meta"}
