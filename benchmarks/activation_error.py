"""Diagnostics for the accuracy table: how much MXFP4 loses on each layer's activations,
with and without each rotation.

For every decoder layer of SmolLM2-135M (fp32, unquantized), on windows of Persuasion, the
inputs of q/k/v (the attention norm's output, R1's position, after fusing the norm weight)
and of down_proj (R4's position) are captured; the table gives the mean relative error
||x - Q(x R) R^T|| / ||x|| of MXFP4 fake quantization for: no rotation, global rotation,
block rotations of 16/32/64. It explains the ordering of the methods where it differs from
the paper's.

    python benchmarks/activation_error.py [--windows 2 --seqlen 1024]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vllm_brq import assets, mxfp4, rotation

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"none": None, "global": ("global_hadamard", 0), "block16": ("block_hadamard", 16),
            "block32": ("block_hadamard", 32), "block64": ("block_hadamard", 64)}


def rel_error(x: torch.Tensor, r: torch.Tensor | None) -> float:
    """||x - Q(x R) R^T|| / ||x|| over all rows (the rotation is orthogonal, so this is the
    error the next linear sees)."""
    xr = x if r is None else rotation.rotate(x.double(), r).float()
    err = xr - mxfp4.fake_quantize(xr)
    return (err.norm() / xr.norm()).item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "activation-error-smollm2.json"))
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = assets.smollm2(ROOT / ".assets" / "smollm2")
    text = (assets.austen(ROOT / ".assets" / "austen") / "persuasion.txt").read_text()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    captured: dict[str, list[torch.Tensor]] = {}

    def keep(name, x):
        captured.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]))

    for i, layer in enumerate(model.model.layers):
        eps = layer.input_layernorm.variance_epsilon
        # q/k/v read norm(x) * w; with w fused into the linears the quantized activation is norm(x)
        layer.input_layernorm.register_forward_pre_hook(
            lambda m, inp, i=i, eps=eps: keep(f"{i}.qkv", inp[0] * torch.rsqrt(inp[0].pow(2).mean(-1, keepdim=True) + eps)))
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, inp, i=i: keep(f"{i}.down", inp[0]))
    with torch.no_grad():
        for w in range(args.windows):
            model(torch.tensor([ids[w * args.seqlen:(w + 1) * args.seqlen]]))

    rows = []
    for key, xs in captured.items():
        x = torch.cat(xs)
        layer, site = key.split(".")
        row = {"layer": int(layer), "site": site}
        for name, spec in VARIANTS.items():
            if spec is None:
                r = None
            else:
                kind, block = spec
                r = rotation.make_rotation(kind, x.shape[-1], block or x.shape[-1], args.seed, f"diag.{site}")
            row[name] = rel_error(x, r)
        rows.append(row)
    rows.sort(key=lambda r: (r["site"], r["layer"]))
    Path(args.json).write_text(json.dumps({"model": "SmolLM2-135M", "text": "Persuasion", "windows": args.windows,
                                           "seqlen": args.seqlen, "seed": args.seed, "rows": rows}, indent=1) + "\n")
    print("| site | " + " | ".join(VARIANTS) + " |")
    print("| --- |" + " --- |" * len(VARIANTS))
    for site in ("qkv", "down"):
        sel = [r for r in rows if r["site"] == site]
        means = [sum(r[v] for r in sel) / len(sel) for v in VARIANTS]
        print(f"| {site} input (mean of {len(sel)} layers) | " + " | ".join(f"{m:.4f}" for m in means) + " |")


if __name__ == "__main__":
    main()
