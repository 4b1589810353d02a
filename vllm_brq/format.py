"""The BRQ checkpoint format, versions 1 and 2: config keys and per-linear tensors.

Both halves of the product read this module: brq-convert writes what ``build_config`` and
``linear_tensor_specs`` describe; the vLLM plugin validates with ``parse_config`` and
``check_linear_tensors`` before serving starts. See README.md, "Checkpoint format".

config.json gains::

    "quantization_config": {
      "quant_method": "brq", "format_version": 1,
      "weight_format": "mxfp4", "activation_format": "mxfp4" | "none", "group_size": 32,
      "rotation": {"kind": ..., "block_size": 32, "seed": 0, "r1": bool, "r1_mode": "fused" | "online",
                   "r2": bool, "r4": bool},
      "quantizer": {"method": "gptq" | "rtn" | "none", ...settings, "calibration": {...}},
      "ignore": ["lm_head"], "converter": "vllm-brq <version>"}

Version 2 adds ``"lm_head_format": "fp8"`` (with ``"ignore": []``): an FP8 lm_head,
y = (q_hi s_hi + q_lo s_lo)(W8 s_w)^T with W8 float8_e4m3fn per-row scaled and x split at run time
into two FP8 terms per token with power-of-two scales (kernels/reference.py ``fp8_split_reference``;
what brq-convert writes by default). Absent, or ``"source"``: lm_head stays in the source dtype,
which version 1 requires. A writer uses version 1 unless the lm_head is FP8, so
older readers keep loading every checkpoint they can serve.

Per quantized linear P:
    P.weight_packed   uint8   [out, in/2]     two E2M1 codes per byte (low nibble first)
    P.weight_scale    uint8   [out, in/32]    E8M0 exponents (+127)
    P.input_rotation  float32 [b, b] | [in/b, b, b]   optional online x -> x @ R
    P.bias            source dtype [out]      if the source linear had one
With quantizer "none" the linears keep their (rotated) ``P.weight`` in the source dtype.
``input_rotation`` is required on down_proj when ``r4`` is set, and on q/k/v/gate/up
(``R1_ONLINE_LINEARS``) when ``r1`` is set with ``r1_mode`` "online": the RMSNorm weights then
keep their gains (times R1's signs) and the residual stream is not rotated. ``r1_mode`` absent
means "fused" (checkpoints before it); a reader that ignores it still serves such a
checkpoint correctly, since every linear applies whatever ``input_rotation`` it carries.

The FP8 lm_head (version 2):
    lm_head.weight        float8_e4m3fn [vocab, hidden]   round(W / s_w), |.| <= 448
    lm_head.weight_scale  float32       [vocab]           s_w = max|W_row| / 448
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_brq import mxfp4

QUANT_METHOD = "brq"
FORMAT_VERSION = 1  # written when the lm_head stays in the source dtype
FP8_HEAD_FORMAT_VERSION = 2  # written with an FP8 lm_head
SUPPORTED_FORMAT_VERSIONS = (1, 2)
WEIGHT_FORMATS = ("mxfp4",)
ACTIVATION_FORMATS = ("mxfp4", "none")
ROTATION_KINDS = ("block_hadamard", "global_hadamard", "outlier_aware", "none")
QUANTIZERS = ("gptq", "rtn", "none")
LM_HEAD_FORMATS = ("source", "fp8")
GROUP_SIZE = mxfp4.BLOCK

WEIGHT_PACKED = "weight_packed"
WEIGHT_SCALE = "weight_scale"
INPUT_ROTATION = "input_rotation"
R1_MODES = ("fused", "online")
R1_ONLINE_LINEARS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


class FormatError(ValueError):
    """A checkpoint that does not follow the BRQ format; the message names the key or tensor."""


@dataclass(frozen=True)
class BRQConfig:
    """The parsed ``quantization_config`` of a BRQ checkpoint."""

    format_version: int
    weight_format: str
    activation_format: str
    group_size: int
    rotation: dict[str, Any]
    quantizer: dict[str, Any]
    ignore: tuple[str, ...] = ("lm_head",)
    converter: str = ""
    lm_head_format: str = "source"
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def weights_quantized(self) -> bool:
        return self.quantizer.get("method") != "none"

    @property
    def quantize_activations(self) -> bool:
        return self.activation_format == "mxfp4"


def _need(cfg: dict, key: str, where: str = "quantization_config"):
    if key not in cfg:
        raise FormatError(f"{where} has no {key!r} key")
    return cfg[key]


def _one_of(value, allowed, key: str):
    if value not in allowed:
        raise FormatError(f"quantization_config.{key} = {value!r} is not supported; expected one of {list(allowed)}")
    return value


def parse_config(cfg: dict[str, Any]) -> BRQConfig:
    """Validate a ``quantization_config`` dict; raise FormatError naming the bad key."""
    method = _need(cfg, "quant_method")
    if method != QUANT_METHOD:
        raise FormatError(f"quantization_config.quant_method is {method!r}, not {QUANT_METHOD!r}")
    version = _need(cfg, "format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise FormatError(
            f"quantization_config.format_version = {version!r} is unknown to this vllm-brq "
            f"(supports {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade vllm-brq or re-convert"
        )
    weight_format = _one_of(_need(cfg, "weight_format"), WEIGHT_FORMATS, "weight_format")
    act = _one_of(_need(cfg, "activation_format"), ACTIVATION_FORMATS, "activation_format")
    group = _need(cfg, "group_size")
    if group != GROUP_SIZE:
        raise FormatError(f"quantization_config.group_size = {group!r}; MXFP4 uses {GROUP_SIZE}")
    rotation = dict(_need(cfg, "rotation"))
    _one_of(_need(rotation, "kind", "quantization_config.rotation"), ROTATION_KINDS, "rotation.kind")
    _one_of(rotation.get("r1_mode", "fused"), R1_MODES, "rotation.r1_mode")
    block = _need(rotation, "block_size", "quantization_config.rotation")
    if not isinstance(block, int) or block < 1:
        raise FormatError(f"quantization_config.rotation.block_size = {block!r} is not a positive integer")
    quantizer = dict(_need(cfg, "quantizer"))
    _one_of(_need(quantizer, "method", "quantization_config.quantizer"), QUANTIZERS, "quantizer.method")
    ignore = tuple(cfg.get("ignore", ["lm_head"]))
    head = _one_of(cfg.get("lm_head_format", "source"), LM_HEAD_FORMATS, "lm_head_format")
    if head != "source" and version < FP8_HEAD_FORMAT_VERSION:
        raise FormatError(f"quantization_config.lm_head_format = {head!r} needs format_version "
                          f"{FP8_HEAD_FORMAT_VERSION}, the file says {version}")
    if (head == "source") != ("lm_head" in ignore):
        raise FormatError(f"quantization_config.ignore = {list(ignore)} contradicts lm_head_format = {head!r} "
                          "(lm_head is ignored exactly when it stays in the source dtype)")
    return BRQConfig(
        format_version=version, weight_format=weight_format, activation_format=act,
        group_size=group, rotation=rotation, quantizer=quantizer,
        ignore=ignore, converter=str(cfg.get("converter", "")), lm_head_format=head, raw=dict(cfg),
    )


def build_config(*, activation_format: str, rotation: dict[str, Any], quantizer: dict[str, Any],
                 converter: str, lm_head_format: str = "source") -> dict[str, Any]:
    """The ``quantization_config`` dict a converter writes (validated before returning)."""
    fp8_head = lm_head_format != "source"
    cfg = {
        "quant_method": QUANT_METHOD, "format_version": FP8_HEAD_FORMAT_VERSION if fp8_head else FORMAT_VERSION,
        "weight_format": "mxfp4", "activation_format": activation_format, "group_size": GROUP_SIZE,
        "rotation": rotation, "quantizer": quantizer, "ignore": [] if fp8_head else ["lm_head"],
        "converter": converter,
    }
    if fp8_head:
        cfg["lm_head_format"] = lm_head_format
    parse_config(cfg)
    return cfg


def linear_tensor_specs(out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Expected (shape, dtype name) of the packed weight tensors of one quantized linear."""
    if in_features % GROUP_SIZE:
        raise FormatError(f"input dimension {in_features} is not divisible by the MXFP4 block size {GROUP_SIZE}")
    return {
        WEIGHT_PACKED: ((out_features, in_features // 2), "uint8"),
        WEIGHT_SCALE: ((out_features, in_features // GROUP_SIZE), "uint8"),
    }


def check_rotation_shape(name: str, shape: tuple[int, ...], in_features: int) -> int:
    """Validate an ``input_rotation`` shape for a linear with ``in_features`` inputs; return b."""
    if len(shape) == 2 and shape[0] == shape[1] and in_features % shape[0] == 0:
        return shape[0]
    if len(shape) == 3 and shape[1] == shape[2] and shape[0] * shape[1] == in_features:
        return shape[1]
    raise FormatError(
        f"{name}.{INPUT_ROTATION} has shape {list(shape)}; expected [b, b] or [{in_features}/b, b, b]"
    )


def check_linear_tensors(name: str, tensors: dict[str, Any], out_features: int, in_features: int) -> None:
    """Check the packed tensors of one linear (anything with .shape and .dtype)."""
    check_tensors(name, tensors, linear_tensor_specs(out_features, in_features))
    if INPUT_ROTATION in tensors:
        check_rotation_shape(name, tuple(tensors[INPUT_ROTATION].shape), in_features)


def fp8_head_tensor_specs(vocab: int, hidden: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Expected (shape, dtype name) of the FP8 lm_head's tensors."""
    return {"weight": ((vocab, hidden), "float8_e4m3fn"), "weight_scale": ((vocab,), "float32")}


def check_tensors(name: str, tensors: dict[str, Any], specs: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Every tensor of ``specs`` present in ``tensors`` with its shape and dtype, else a FormatError."""
    for key, (shape, dtype) in specs.items():
        if key not in tensors:
            raise FormatError(f"checkpoint is missing tensor {name}.{key}")
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise FormatError(f"tensor {name}.{key} has shape {list(t.shape)}, expected {list(shape)}")
        if str(t.dtype).replace("torch.", "") != dtype:
            raise FormatError(f"tensor {name}.{key} has dtype {t.dtype}, expected {dtype}")
