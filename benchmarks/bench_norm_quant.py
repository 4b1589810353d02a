"""The RMSNorm -> linear segment with and without the norm fused into the act-quant (GPU).

    python benchmarks/bench_norm_quant.py [--out DIR]

vLLM runs each decoder layer's q/k/v and gate/up linears right after an (add +) RMSNorm;
vllm_brq/fusion.py turns the pair into `dispatch.brq_norm_linear`, whose norm and
activation quantization are one kernel (kernels/norm_quant.py). This times the segment
(add + RMSNorm, then the linear) on the Llama-3-8B shapes, each variant captured in one CUDA
graph over distinct layers' weights (32 at M = 1, so the weights stream cold as in a decode
step; 4 in prefill), in the same run:
  bf16      the norm (torch.compile of the reference: the Inductor kernel vLLM's compiled
            model runs for its RMSNorm IR op), then cuBLAS bf16;
  unfused   the same norm, then dispatch.brq_linear (separate act-quant; BRQ_FUSE_NORM=0);
  fused     dispatch.brq_norm_linear (vLLM's default with the brq plugin).
Checks first (bf16, random data with outliers): the fused kernel's residual output, FP8
operand and decode operand against the norm reference followed by the plain act-quant
(counts of differing elements), and per row the fused segment's output against the reference
norm + dispatch.brq_linear. Per row also the pieces alone: the compiled norm, the act-quant,
the fused norm + act-quant kernel.
Writes norm-quant-<gpu>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, graph_time, outlier_x, rel, write_results  # noqa: E402

from vllm_brq import mxfp4  # noqa: E402
from vllm_brq.kernels import act_quant as aq  # noqa: E402
from vllm_brq.kernels import dispatch  # noqa: E402
from vllm_brq.kernels import norm_quant as nq  # noqa: E402
from vllm_brq.kernels.reference import rms_norm_reference  # noqa: E402

EPS = 1e-5
MS = (1, 16, 256, 1024, 4096, 8192)


def compiled_norm():
    """The norm as vLLM's compiled model runs it without the fusion: vLLM 0.24 on CUDA lowers its
    RMSNorm IR op to the native torch code when compiling with Inductor, i.e. an Inductor kernel."""
    return torch.compile(lambda x, r, w: rms_norm_reference(x, r, w, EPS), dynamic=False)


def checks(gen) -> dict:
    """Differences of the fused kernels from reference norm + plain act-quant (bf16)."""
    out = {}
    for M, K in ((1, 4096), (5, 4096), (1024, 4096), (300, 14336)):
        x, r = outlier_x(M, K, gen), outlier_x(M, K, gen)
        w = (torch.rand(K, generator=gen, device="cuda") + 0.5).bfloat16()
        n0, r0 = rms_norm_reference(x, r, w, EPS)
        f0, e0, _ = aq.quantize_activation(n0, None, aq.MODE_FP8, with_scale=True)
        f, e, _, ro = nq.rms_norm_quantize(x, r, w, EPS, aq.MODE_FP8)
        p0, s0 = aq.quantize_activation(n0, None, aq.MODE_PAIRS)
        p, s, ro2 = nq.rms_norm_quantize(x, r, w, EPS, aq.MODE_PAIRS)
        out[f"M{M}_K{K}"] = {
            "elements": M * K, "residual_diff": int((ro != r0).sum() + (ro2 != r0).sum()),
            "fp8_operand_diff": int((f.float() != f0.float()).sum()), "fp8_row_exp_diff": int((e != e0).sum()),
            "pairs_diff": int((p != p0).sum()), "pairs_scale_diff": int((s != s0).sum())}
    return out


def layer(N, K, gen):
    w = torch.randn(N, K, generator=gen, device="cuda") * 0.02
    wp, ws = mxfp4.quantize(w)
    return {"wp": wp, "ws": ws, "bf16": w.bfloat16(), "norm_w": (torch.rand(K, generator=gen, device="cuda") + 0.5)
            .bfloat16(), **dispatch.prepare_extras(wp, ws)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--shapes", default="qkv,gate_up")
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    norm = compiled_norm()
    result = {"checks": checks(gen), "rows": []}
    print(result["checks"], flush=True)
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        for M in MS:
            layers = [layer(N, K, gen) for _ in range(32 if M == 1 else 4)]
            x, r = outlier_x(M, K, gen), outlier_x(M, K, gen)

            def fused(L):
                return lambda: dispatch.brq_norm_linear(x, r, L["norm_w"], EPS, L["wp"], L["ws"], None, None, True,
                                                        L.get("weight_fp8"), L.get("weight_fp8_scale"))

            def unfused(L):
                def f():
                    n, ro = norm(x, r, L["norm_w"])
                    return dispatch.brq_linear(n, L["wp"], L["ws"], None, None, True, L.get("weight_fp8"),
                                               L.get("weight_fp8_scale")), ro
                return f

            def bf16(L):
                def f():
                    n, ro = norm(x, r, L["norm_w"])
                    return torch.nn.functional.linear(n, L["bf16"]), ro
                return f

            L0 = layers[0]
            yf, rf = fused(L0)()
            yu, ru = unfused(L0)()
            n_ref, r_ref = rms_norm_reference(x, r, L0["norm_w"], EPS)
            y_ref = dispatch.brq_linear(n_ref, L0["wp"], L0["ws"], None, None, True, L0.get("weight_fp8"),
                                        L0.get("weight_fp8_scale"))
            row = {"op": name, "M": M, "N": N, "K": K, "layers": len(layers),
                   "fused_vs_reference_rel": rel(yf, y_ref), "fused_vs_reference_identical": bool(torch.equal(yf, y_ref)),
                   "residual_identical": bool(torch.equal(rf, r_ref)),
                   # the unfused path's norm is Inductor's, which rounds once where the IR op rounds twice
                   "fused_vs_unfused_rel": rel(yf, yu)}
            for key, make in (("bf16_ms", bf16), ("unfused_ms", unfused), ("fused_ms", fused)):
                row[key] = graph_time([make(L) for L in layers])
            mode = aq.MODE_PAIRS if M == 1 else aq.MODE_FP8  # the quantization each path runs alone
            kw = {} if M == 1 else {"with_scale": True, "rounding": dispatch.act_rounding()}
            row["norm_alone_ms"] = graph_time([lambda L=L: norm(x, r, L["norm_w"]) for L in layers])
            row["act_quant_alone_ms"] = graph_time([lambda: aq.quantize_activation(n_ref, None, mode, **kw)])
            row["norm_quant_alone_ms"] = graph_time([lambda L=L: nq.rms_norm_quantize(x, r, L["norm_w"], EPS, mode)
                                                     for L in layers])
            row["unfused_vs_bf16"] = row["bf16_ms"] / row["unfused_ms"]
            row["fused_vs_bf16"] = row["bf16_ms"] / row["fused_ms"]
            row["fused_vs_unfused"] = row["unfused_ms"] / row["fused_ms"]
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            result["rows"].append(row)
            del layers
            torch.cuda.empty_cache()
            write_results(args.out, "norm-quant", result)


if __name__ == "__main__":
    main()
