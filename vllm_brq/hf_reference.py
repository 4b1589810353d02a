"""Load a BRQ checkpoint into transformers, simulating exactly what vLLM serves.

Every decoder linear becomes a ``ReferenceLinear`` that calls
``kernels.reference.brq_linear_reference`` (the spec of the served linear): online input
rotation, MXFP4 activation fake quantization when the checkpoint is W4A4, dequantized
MXFP4 weight. Checkpoints made with ``--quantizer none`` keep an fp ``weight``; their
linears apply the same rotation and activation rule around it. Use it for accuracy checks
(perplexity, logits against the original model) without a vLLM server.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from vllm_brq import format as fmt
from vllm_brq.kernels.reference import activation_reference, brq_linear_reference, fp8_linear_reference

HEAD = "lm_head"


class ReferenceLinear(nn.Module):
    """y = Q(x R) W^T + b with W packed MXFP4 (``weight_packed``/``weight_scale``) or fp
    (``weight``), R the optional ``input_rotation``; computed in float32 like the reference."""

    def __init__(self, weight: torch.Tensor | None = None, weight_packed: torch.Tensor | None = None,
                 weight_scale: torch.Tensor | None = None, input_rotation: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, quantize_activations: bool = True):
        super().__init__()
        if (weight is None) == (weight_packed is None):
            raise ValueError("give either an fp weight or weight_packed + weight_scale")
        self.quantize_activations = quantize_activations
        for name, t in (("weight", weight), ("weight_packed", weight_packed),
                        ("weight_scale", weight_scale), ("input_rotation", input_rotation), ("bias", bias)):
            self.register_buffer(name, t)
        self.in_features = (weight.shape[1] if weight is not None else weight_packed.shape[1] * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return self._fp_forward(x)
        return brq_linear_reference(x, self.weight_packed, self.weight_scale, self.input_rotation,
                                    self.bias, self.quantize_activations)

    def _fp_forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = activation_reference(x, self.input_rotation, self.quantize_activations)
        y = xf @ self.weight.float().t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


class Fp8Head(nn.Module):
    """The FP8 lm_head as served: e4m3 ``weight`` [V, d], float32 ``weight_scale`` [V], the
    input split into two FP8 terms per token (kernels/reference.py ``fp8_linear_reference``)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear_reference(x, self.weight, self.weight_scale)


def _linear_prefixes(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the linears stored in BRQ form: packed weights, or an input rotation."""
    found = set()
    for key in tensors:
        for suffix in (fmt.WEIGHT_PACKED, fmt.INPUT_ROTATION):
            if key.endswith("." + suffix):
                found.add(key[: -len(suffix) - 1])
    return sorted(found)


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A transformers causal LM whose decoder linears run the BRQ reference linear."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    qcfg = fmt.parse_config(raw.get("quantization_config") or {})
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    names = set(_linear_prefixes(tensors))
    if qcfg.weights_quantized or qcfg.quantize_activations:
        # every decoder linear follows the served rule, rotated or not
        names |= {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    for name in sorted(names):
        parts = {k[len(name) + 1:]: tensors.pop(k) for k in list(tensors) if k.rsplit(".", 1)[0] == name}
        if fmt.WEIGHT_PACKED in parts:
            fmt.check_linear_tensors(name, parts, parts[fmt.WEIGHT_SCALE].shape[0], parts[fmt.WEIGHT_PACKED].shape[1] * 2)
        elif "weight" in parts:
            parts["weight"] = parts["weight"].to(dtype)
        if "bias" in parts:
            parts["bias"] = parts["bias"].to(dtype)
        module = ReferenceLinear(quantize_activations=qcfg.quantize_activations, **parts)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, module)
    if qcfg.lm_head_format == "fp8":
        if config.tie_word_embeddings:
            raise fmt.FormatError("an FP8 lm_head needs tie_word_embeddings false in config.json")
        parts = {k[len(HEAD) + 1:]: tensors.pop(k) for k in list(tensors) if k.startswith(HEAD + ".")}
        fmt.check_tensors(HEAD, parts, fmt.fp8_head_tensor_specs(config.vocab_size, model.lm_head.in_features))
        model.lm_head = Fp8Head(parts["weight"], parts["weight_scale"])
        names.add(HEAD)
    floats = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(floats, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in names
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise fmt.FormatError(f"checkpoint tensors do not fit the model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()
