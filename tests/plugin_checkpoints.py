"""Tiny Llama checkpoints for the plugin tests, written directly from format + mxfp4.

These do not go through brq-convert on purpose: the loader tests need checkpoints they
can break one tensor at a time, and must not depend on the converter's choices.
A "BRQ" checkpoint here is RTN onto MXFP4, with a shared 32x32 block rotation on each
down_proj's input (folded into the weight: (x R)(W R)^T = x W^T), like the converter's R4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_brq import format as fmt
from vllm_brq import mxfp4
from vllm_brq.rotation import block_rotation, rotate_weight_input

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """The converter tests' tiny tied Llama (tests/tiny_models.py) plus SmolLM2's chat
    template, so the chat endpoint works on it."""
    import tiny_models

    tiny_models.build("llama_tied", out, tokenizer_dir, seed=seed, **overrides)
    shutil.copy(tokenizer_dir / "chat_template.jinja", out / "chat_template.jinja")
    return out


def quantization_config(activation_format: str = "mxfp4", quantizer: str = "rtn", **overrides) -> dict:
    cfg = fmt.build_config(
        activation_format=activation_format,
        rotation={"kind": "block_hadamard", "block_size": 32, "seed": 0, "r1": False, "r2": False, "r4": True},
        quantizer={"method": quantizer}, converter="tests/plugin_checkpoints.py",
    )
    cfg.update(overrides)
    return cfg


def brq_checkpoint(src: Path, out: Path, activation_format: str = "mxfp4", quantizer: str = "rtn",
                   qkv_rotation: bool = False, shared_r4: bool = True) -> Path:
    """RTN (or ``quantizer="none"``: rotated fp weights) BRQ checkpoint of ``src``.
    ``qkv_rotation`` also gives q/k/v one per-block [in/32, 32, 32] rotation per layer
    (identical copies, as vLLM fuses them), the general form the outlier-aware mode writes;
    ``shared_r4=False`` stores R4 per block, which row-parallel shards must slice."""
    tensors = load_file(src / "model.safetensors")
    result = {}
    for key, t in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf != "weight" or prefix.rpartition(".")[2] not in LINEARS:
            result[key] = t
            continue
        w = t.float()
        parent, _, leaf = prefix.rpartition(".")
        r = None
        if leaf == "down_proj":
            r = block_rotation(w.shape[1], 32, seed=0, stream=f"r4.{prefix}", shared=shared_r4)
        elif qkv_rotation and leaf in ("q_proj", "k_proj", "v_proj"):
            r = block_rotation(w.shape[1], 32, seed=0, stream=f"qkv.{parent}")
        if r is not None:
            w = rotate_weight_input(w.double(), r).float()
            result[f"{prefix}.{fmt.INPUT_ROTATION}"] = r.float()
        if quantizer == "none":
            result[key] = w.to(t.dtype)
        else:
            result[f"{prefix}.{fmt.WEIGHT_PACKED}"], result[f"{prefix}.{fmt.WEIGHT_SCALE}"] = mxfp4.quantize(w)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    save_file(result, out / "model.safetensors", metadata={"format": "pt"})
    set_quantization_config(out, quantization_config(activation_format, quantizer))
    return out


def set_quantization_config(path: Path, qcfg: dict) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = qcfg
    (path / "config.json").write_text(json.dumps(config, indent=2))


def edit_tensors(src: Path, out: Path, edit) -> Path:
    """A copy of checkpoint ``src`` whose tensor dict went through ``edit(dict) -> None``."""
    shutil.copytree(src, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def with_fp8_head(src: Path, out: Path) -> Path:
    """A copy of BRQ checkpoint ``src`` (tied) with an FP8 lm_head (format version 2) made from the
    embedding, untied in config.json."""
    from vllm_brq.kernels.reference import fp8_head_weights_reference

    def edit(t):
        t["lm_head.weight"], t["lm_head.weight_scale"] = fp8_head_weights_reference(t["model.embed_tokens.weight"])

    edit_tensors(src, out, edit)
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2))
    qcfg = config["quantization_config"]
    qcfg.update(format_version=fmt.FP8_HEAD_FORMAT_VERSION, ignore=[], lm_head_format="fp8")
    set_quantization_config(out, qcfg)
    return out
