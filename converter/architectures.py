"""Which Hugging Face architectures brq-convert understands, and where their parts live.

Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3 share one layout (pre-norm decoder layers
with q/k/v/o attention and a gated MLP); they differ in q/k/v biases (Qwen2) and per-head
q/k norms (Qwen3), neither of which a rotation at R1/R2/R4 touches except the v bias.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConvertError

SUPPORTED = {
    "llama": "Llama 2/3/3.1/3.2",
    "mistral": "Mistral",
    "qwen2": "Qwen2/2.5",
    "qwen3": "Qwen3",
}

# Linears inside a decoder layer, in the order calibration quantizes them: each group
# reads one input (so its members share a GPTQ Hessian).
GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEARS = tuple(name for group in GROUPS for name in group)


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int


def check_supported(config) -> None:
    """Raise ConvertError naming the supported architectures if ``config`` is not one."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        names = ", ".join(f"{v} ({k})" for k, v in SUPPORTED.items())
        arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown"
        raise ConvertError(
            f"unsupported architecture {model_type!r} ({arch}); brq-convert supports {names}"
        )


def dims(config) -> Dims:
    heads = config.num_attention_heads
    return Dims(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        layers=config.num_hidden_layers,
    )


def check_divisible(d: Dims, group: int, rotation_block: int | None, r1: bool, r2: bool, r4: bool) -> None:
    """Every linear input must split into MXFP4 groups, every rotated dimension into blocks."""
    need = {"hidden_size": (d.hidden, group), "intermediate_size": (d.intermediate, group),
            "num_attention_heads * head_dim": (d.heads * d.head_dim, group)}
    if rotation_block:
        if r1:
            need["hidden_size (R1)"] = (d.hidden, rotation_block)
        if r2:
            need["head_dim (R2)"] = (d.head_dim, rotation_block)
        if r4:
            need["intermediate_size (R4)"] = (d.intermediate, rotation_block)
    for what, (value, block) in need.items():
        if value % block:
            raise ConvertError(f"{what} = {value} is not divisible by the block size {block}")


def sub(module, dotted: str):
    """``sub(layer, 'self_attn.q_proj')`` -> the submodule."""
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def set_sub(module, dotted: str, new) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(sub(module, parent) if parent else module, leaf, new)
