"""How much a W4A4 model's logprobs move under tiny input noise, next to its unquantized source.

Explains the GPU agreement numbers (benchmarks/gpu_agreement.py): a different but equally
exact backend perturbs activations at the 1e-6..1e-3 level (other accumulation orders,
TF32 attention, bf16), and MXFP4 activation quantization turns each value that crosses a
rounding boundary into a full E2M1 step. Here, on the CPU reference alone, the input
embeddings are scaled by (1 + eps * N(0, 1)) and the mean |logprob change| is measured
for the unquantized model and its BRQ W4A4 checkpoint.

    python benchmarks/w4a4_sensitivity.py --source SMOLLM2 --brq CKPT --text persuasion.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_agreement import prompts  # noqa: E402


@torch.no_grad()
def logprobs(model, ps: list[list[int]], eps: float) -> torch.Tensor:
    emb = model.get_input_embeddings()
    out = []
    for p in ps:
        x = torch.tensor([p])
        h = emb(x)
        if eps:
            h = h * (1 + eps * torch.randn(h.shape, generator=torch.Generator().manual_seed(0)))
        logp = torch.log_softmax(model(inputs_embeds=h).logits[0].double(), -1)
        out.append(logp[torch.arange(len(p) - 1), torch.tensor(p[1:])])
    return torch.cat(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--brq", type=Path, required=True)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--eps", default="1e-6,1e-5,1e-4,1e-3")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from vllm_brq import hf_reference

    ps = prompts(args.source, args.text)
    models = {"unquantized": AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval(),
              "brq w4a4": hf_reference.load(args.brq)}
    result = {}
    for name, model in models.items():
        base = logprobs(model, ps, 0.0)
        for eps in map(float, args.eps.split(",")):
            d = (logprobs(model, ps, eps) - base).abs()
            result[f"{name} eps={eps:g}"] = {"mean_abs_logprob_diff": float(d.mean()), "max": float(d.max())}
            print(name, eps, result[f"{name} eps={eps:g}"], flush=True)
    if args.out:
        args.out.write_text(json.dumps({"tokens": int(base.numel()), "runs": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
