"""What the FP8 lm_head costs in perplexity, on SmolLM2-135M, on the CPU, and what each part buys.

The unquantized model with only its lm_head changed (the head's input is the final norm's output,
unrotated, as brq-convert's default R1 online leaves it), windows of Persuasion (the repo's test
text, .assets/austen): e4m3 weights with a scale per row by round to nearest or by GPTQ (the
converter's `GPTQ(grid="fp8_rows")`, its Hessian from the final norm's outputs on 32 x 512 tokens
of the other novels), times the input as one FP8 term per token (`fp8_rows_reference`) or two
(`fp8_split_reference`, what the served head does); and, for comparison, MXFP4 weights (W4A16)
and MXFP4 weights + input (W4A4), round to nearest.

    python benchmarks/head_accuracy.py --out benchmarks/results     # ~6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
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


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_brq import assets, mxfp4
    from vllm_brq.kernels.reference import fp8_rows_reference, fp8_split_reference

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    src = assets.smollm2(ROOT / ".assets" / "smollm2")
    books = assets.austen(ROOT / ".assets" / "austen")
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok((books / "persuasion.txt").read_text(), return_tensors="pt").input_ids[0]
    cal = tok((books / "calibration.txt").read_text(), return_tensors="pt").input_ids[0][: 32 * 512].view(32, 512)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    w = model.lm_head.weight.detach().clone()
    model.lm_head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    model.lm_head.weight.data = w

    # the head's Hessian: the final norm's outputs, captured at the head
    from vllm_brq.converter.gptq import GPTQ

    gptq = GPTQ(w.shape[1], grid="fp8_rows")
    hook = model.lm_head.register_forward_pre_hook(lambda _m, a: gptq.add_batch(a[0]))
    with torch.no_grad():
        for window in cal:
            model(window[None])
    hook.remove()

    def fp8(t):
        q, s = fp8_rows_reference(t)
        return q.float() * s

    def fp8_split(t):
        q, s = fp8_split_reference(t.reshape(-1, t.shape[-1]))
        n = q.shape[0] // 2
        return (q[:n].float() * s[:n] + q[n:].float() * s[n:]).view_as(t)

    w_rtn, w_gptq, w4 = fp8(w), gptq.quantize(w), mxfp4.fake_quantize(w)
    variants = {  # name -> (weight, input quantizer)
        "source": (w, None),
        "fp8 weights rtn, one fp8 input term": (w_rtn, fp8),
        "fp8 weights rtn, two fp8 input terms": (w_rtn, fp8_split),
        "fp8 weights gptq, one fp8 input term": (w_gptq, fp8),
        "fp8 weights gptq, two fp8 input terms (the default)": (w_gptq, fp8_split),
        "fp8 weights gptq, bf16 input": (w_gptq, None),
        "mxfp4 weights (W4A16)": (w4, None),
        "mxfp4 weights + input (W4A4)": (w4, mxfp4.fake_quantize),
    }
    out = {}
    for name, (wq, q) in variants.items():
        model.lm_head.weight.data = wq
        hook = model.lm_head.register_forward_pre_hook(lambda _m, a, q=q: (q(a[0]),)) if q else None
        out[name] = perplexity(model, ids, args.windows, args.seqlen)
        if hook:
            hook.remove()
        print(f"head alone, {name}: {out[name]:.2f}", flush=True)
    result = {"model": "SmolLM2-135M-Instruct (PyPI GGUF, dequantized)", "text": "Persuasion",
              "windows": args.windows, "seqlen": args.seqlen, "dtype": "float32",
              "gptq_calibration": "32 x 512 tokens of the other five novels", "head_alone": out,
              "command": "python benchmarks/head_accuracy.py"}
    dest = Path(args.out) / "head-accuracy-smollm2.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(dest)


if __name__ == "__main__":
    main()
