"""Write a converted model: safetensors, config.json, tokenizer/generation files, model card.

Everything is written in a fixed order with sorted keys so the same conversion gives
byte-identical files (no timestamps, no paths of temporary folders).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .architectures import SUPPORTED

# Files copied unchanged from the source folder (tokenizer, chat template, generation).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
SOURCE_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint tensors: contiguous CPU copies; a tied lm_head is not written twice."""
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    return dict(sorted(tensors.items()))


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_checkpoint(folder: Path, model: nn.Module, src: Path, qcfg: dict, card: str) -> None:
    weights = folder / "model.safetensors"
    save_file(state_dict(model), str(weights), metadata={"format": "pt"})
    weights.chmod(0o666 & ~umask())  # safetensors creates it owner-only
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    cfg["quantization_config"] = qcfg
    cfg["tie_word_embeddings"] = bool(model.config.tie_word_embeddings)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    (folder / "README.md").write_text(card)


def _norm_line(rot: dict) -> str:
    if rot.get("r1_mode") == "online":
        return ("- RMSNorm weights keep their gains (times R1's random signs); R1 (hidden) is applied online at "
                "q/k/v and gate/up and R4 at the down_proj input (`input_rotation`, the plain Hadamard H of "
                "R = diag(s) H), their weight sides folded into the weights, as R2 (per attention head, v/o).")
    return ("- RMSNorm weights fused into the following linears; rotations folded into the weights "
            "(R1 hidden, R2 per attention head on v/o, R4 on the down_proj input, applied online as "
            "`input_rotation`; a randomized Hadamard R4 = diag(s) H keeps H online, s folded into up_proj).")


def _head_line(report) -> str:
    by = "GPTQ on the calibration data" if report.head_output_error is not None else "round to nearest"
    out = "" if report.head_output_error is None else f", output error {report.head_output_error:.4f}"
    return ("lm_head: FP8 e4m3 with a scale per row, quantized by " + by + ", its input split into two FP8 "
            f"terms per token at run time (relative weight error {report.head_weight_error:.4f}{out}).")


def model_card(source: str, qcfg: dict, command: str, report) -> str:
    """Model card: what was done, with which settings and data, and how to reproduce it."""
    from .pipeline import summary_lines

    rot, q = qcfg["rotation"], qcfg["quantizer"]
    act = "MXFP4 (W4A4)" if qcfg["activation_format"] == "mxfp4" else "none (W4A16)"
    positions = ", ".join(k.upper() for k in ("r1", "r2", "r4") if rot[k]) or "none"
    calib = q.get("calibration")
    lines = [
        "---", "tags: [mxfp4, brq, vllm]", "---", "",
        f"# {Path(source).name} — block-rotated MXFP4 (BRQ)", "",
        f"Converted from `{source}` by {qcfg['converter']} (`brq-convert`).",
        "Serve it with `vllm serve <this folder> --quantization brq` (the vllm-brq plugin).", "",
        "## Method", "",
        _norm_line(rot),
        f"- Rotation: {rot['kind']}, block size {rot['block_size']}, seed {rot['seed']}, positions: {positions}.",
        f"- Weights: MXFP4 (E2M1, E8M0 scale per 32 inputs), quantizer: {q['method']}"
        + (f" (blocks of {q['block_size']} columns, relative damping {q['damp']}, act-order over "
           f"static groups, scale search {'on' if q['scale_search'] else 'off'})" if q["method"] == "gptq" else "")
        + ".",
        f"- Activations: {act}. Embeddings and norms stay in the source dtype (rotated); "
        + (_head_line(report) if qcfg.get("lm_head_format") == "fp8" else "so does lm_head."),
        f"- Architectures supported by the converter: {', '.join(SUPPORTED.values())}.",
    ]
    if report.untied_lm_head:
        lines.append("- The final norm weight is fused into lm_head, so lm_head is stored untied from the embedding.")
    lines += ["", "## Calibration", ""]
    lines.append(f"{calib['nsamples']} windows of {calib['seqlen']} tokens from {calib['source']}."
                 if calib else "None (no calibration data is used by this quantizer).")
    lines += ["", "## Quantization error (relative, mean over each layer's linears)", "", "```",
              *summary_lines(report, with_time=False), "```", "",
              "## Reproduce", "", "```", command, "```", ""]
    return "\n".join(lines)
