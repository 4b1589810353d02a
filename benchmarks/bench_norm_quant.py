"""The linears' producer segments with and without the producer fused into the act-quant (GPU).

    python benchmarks/bench_norm_quant.py [--out DIR] [--shapes qkv,gate_up,down,qkv_r1,gate_up_r1]

vLLM runs the q/k/v and gate/up linears right after an (add +) RMSNorm, and down_proj right
after the SiLU-mul; vllm_brq/fusion.py turns each pair into one op (`dispatch.brq_norm_linear`:
norm and act-quant in one kernel, kernels/norm_quant.py; `dispatch.brq_silu_linear`: silu-mul
in the act-quant's loads, R4's Hadamard included). This times the segment (producer, then the
linear) on the Llama-3-8B shapes, each variant captured in one CUDA graph over distinct
layers' weights (32 at M = 1, so the weights stream cold as in a decode step; 4 in prefill),
in the same run:
  bf16      the producer as Inductor compiles it (torch.compile of the reference: what vLLM's
            compiled model runs for its RMSNorm IR op and SiluAndMul), then cuBLAS bf16;
  unfused   the same producer, then dispatch.brq_linear (separate act-quant; BRQ_FUSE=0);
  fused     the fused op (vLLM's default with the brq plugin).
qkv_r1 / gate_up_r1: the same segments of a `--r1-mode online` checkpoint, whose q/k/v and
gate/up rotate their input online by the plain 32x32 Hadamard (inside the norm kernel when fused).
Checks first (bf16, random data with outliers): the fused kernels' outputs against the
reference producer followed by the plain act-quant (counts of differing elements), and per
row the fused segment's output against the reference producer + dispatch.brq_linear. Per row
also the pieces alone: the compiled producer, the act-quant, the fused producer + act-quant.
Writes norm-quant-<gpu>.json and prints the README table (`markdown`).
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
from vllm_brq.kernels.reference import rms_norm_reference, silu_mul_reference  # noqa: E402
from vllm_brq.rotation import hadamard  # noqa: E402

EPS = 1e-5
MS = (1, 16, 256, 1024, 4096, 8192)


def compiled_norm():
    """The norm as vLLM's compiled model runs it without the fusion: vLLM 0.24 on CUDA lowers its
    RMSNorm IR op to the native torch code when compiling with Inductor, i.e. an Inductor kernel."""
    return torch.compile(lambda x, r, w: rms_norm_reference(x, r, w, EPS), dynamic=False)


def checks(gen) -> dict:
    """Differences of the fused kernels from the reference producer + plain act-quant (bf16; SiLU-mul
    with R4's Hadamard)."""
    out = {}
    for M, K in ((1, 4096), (5, 4096), (1024, 4096), (300, 14336)):
        x, r = outlier_x(M, K, gen), outlier_x(M, K, gen)
        w = (torch.rand(K, generator=gen, device="cuda") + 0.5).bfloat16()
        n0, r0 = rms_norm_reference(x, r, w, EPS)
        f0, e0, _ = aq.quantize_activation(n0, None, aq.MODE_FP8, with_scale=True)
        f, e, _, ro = nq.rms_norm_quantize(x, r, w, EPS, aq.MODE_FP8)
        p0, s0 = aq.quantize_activation(n0, None, aq.MODE_PAIRS)
        p, s, ro2 = nq.rms_norm_quantize(x, r, w, EPS, aq.MODE_PAIRS)
        rot = aq.Rotation.prepare(hadamard(32).float().cuda())
        rf0, re0, _ = aq.quantize_activation(n0, rot, aq.MODE_FP8, with_scale=True)  # R1 online
        rf, re, _, _ = nq.rms_norm_quantize(x, r, w, EPS, aq.MODE_FP8, input_rotation=rot)
        rp0, rs0 = aq.quantize_activation(n0, rot, aq.MODE_PAIRS)
        rp, rs, _ = nq.rms_norm_quantize(x, r, w, EPS, aq.MODE_PAIRS, input_rotation=rot)
        gu = outlier_x(M, 2 * K, gen)
        xs = silu_mul_reference(gu)
        sf = aq.quantize_activation(gu, rot, aq.MODE_FP8, with_scale=True, silu=True)
        sf0 = aq.quantize_activation(xs, rot, aq.MODE_FP8, with_scale=True)
        sp, sp0 = aq.quantize_activation(gu, rot, aq.MODE_PAIRS, silu=True), aq.quantize_activation(xs, rot, aq.MODE_PAIRS)
        out[f"M{M}_K{K}"] = {
            "silu_fp8_operand_diff": int((sf[0].float() != sf0[0].float()).sum()),
            "silu_fp8_row_exp_diff": int((sf[1] != sf0[1]).sum()), "silu_pairs_diff": int((sp[0] != sp0[0]).sum()),
            "silu_pairs_scale_diff": int((sp[1] != sp0[1]).sum()),
            "elements": M * K, "residual_diff": int((ro != r0).sum() + (ro2 != r0).sum()),
            "fp8_operand_diff": int((f.float() != f0.float()).sum()), "fp8_row_exp_diff": int((e != e0).sum()),
            "pairs_diff": int((p != p0).sum()), "pairs_scale_diff": int((s != s0).sum()),
            "r1_fp8_operand_diff": int((rf.float() != rf0.float()).sum()), "r1_fp8_row_exp_diff": int((re != re0).sum()),
            "r1_pairs_diff": int((rp != rp0).sum()), "r1_pairs_scale_diff": int((rs != rs0).sum())}
    return out


def layer(N, K, gen, rotated: bool):
    w = torch.randn(N, K, generator=gen, device="cuda") * 0.02
    wp, ws = mxfp4.quantize(w)
    rot = hadamard(32).float().cuda() if rotated else None  # brq-convert's R4 (down_proj), online R1 (_r1)
    return {"wp": wp, "ws": ws, "rot": rot, "bf16": w.bfloat16(),
            "norm_w": (torch.rand(K, generator=gen, device="cuda") + 0.5).bfloat16(),
            **dispatch.prepare_extras(wp, ws, rot)}


def segment(kind: str, x, r, L, norm, silu) -> dict:
    """The segment's variants for one layer (callables): the producer is the add + RMSNorm ("norm",
    x and residual r) or the SiLU-mul of gate_up x ("silu", down_proj with R4)."""
    w = (L["wp"], L["ws"], L["rot"], None, True, L.get("weight_fp8"), L.get("weight_fp8_scale"), L.get("rotation_sign"))
    if kind == "norm":
        pre, ref_in = (lambda: norm(x, r, L["norm_w"])[0]), (lambda: rms_norm_reference(x, r, L["norm_w"], EPS)[0])
        fused = lambda: dispatch.brq_norm_linear(x, r, L["norm_w"], EPS, *w)[0]  # noqa: E731
    else:
        pre, ref_in = (lambda: silu(x)), (lambda: silu_mul_reference(x))
        fused = lambda: dispatch.brq_silu_linear(x, *w)  # noqa: E731
    return {"bf16": lambda: torch.nn.functional.linear(pre(), L["bf16"]), "unfused": lambda: dispatch.brq_linear(
        pre(), *w), "fused": fused, "reference": lambda: dispatch.brq_linear(ref_in(), *w), "pre": pre}


def quant_alone(kind, x, r, L, mode):
    """The fused producer + act-quant kernel alone, and the act-quant alone on its input."""
    kw = {} if mode == aq.MODE_PAIRS else {"with_scale": True, "rounding": dispatch.act_rounding()}
    rot = aq.Rotation(L["rot"], L.get("rotation_sign")) if L["rot"] is not None else None
    if kind == "norm":
        return (lambda: nq.rms_norm_quantize(x, r, L["norm_w"], EPS, mode, input_rotation=rot),
                lambda xin: aq.quantize_activation(xin, rot, mode, **kw))
    return (lambda: aq.quantize_activation(x, rot, mode, silu=True, **kw),
            lambda xin: aq.quantize_activation(xin, rot, mode, **kw))


def markdown(result: dict) -> str:
    """The README table: each segment's speed-up over bf16, unfused and fused, per M."""
    names = {"qkv": "norm + qkv", "gate_up": "norm + gate_up", "down": "SiLU-mul + down (R4)",
             "qkv_r1": "norm + qkv, R1 online", "gate_up_r1": "norm + gate_up, R1 online"}
    ms = sorted({r["M"] for r in result["rows"]})
    lines = ["| segment | " + " | ".join(f"M = {m}" if i == 0 else str(m) for i, m in enumerate(ms)) + " |",
             "| --- |" + " --- |" * len(ms)]
    for op in (op for op in names if any(r["op"] == op for r in result["rows"])):  # the shapes that ran
        rows = {r["M"]: r for r in result["rows"] if r["op"] == op}
        for key, label in (("unfused_vs_bf16", "unfused"), ("fused_vs_bf16", "fused")):
            lines.append(f"| {names[op]}, {label} | " + " | ".join(f"{rows[m][key]:.2f}x" for m in ms) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--shapes", default="qkv,gate_up,down")
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    norm = compiled_norm()
    silu = torch.compile(silu_mul_reference, dynamic=False)  # Inductor's SiLU-mul, as in vLLM's compiled model
    result = {"checks": checks(gen), "rows": []}
    print(result["checks"], flush=True)
    for name in args.shapes.split(","):
        N, K = SHAPES[name.removesuffix("_r1")]
        kind = "silu" if name == "down" else "norm"
        for M in MS:
            layers = [layer(N, K, gen, kind == "silu" or name.endswith("_r1")) for _ in range(32 if M == 1 else 4)]
            x, r = outlier_x(M, 2 * K if kind == "silu" else K, gen), outlier_x(M, K, gen)
            seg = [segment(kind, x, r, L, norm, silu) for L in layers]
            yf, yu, y_ref = seg[0]["fused"](), seg[0]["unfused"](), seg[0]["reference"]()
            row = {"op": name, "producer": kind, "M": M, "N": N, "K": K, "layers": len(layers),
                   "fused_vs_reference_rel": rel(yf, y_ref), "fused_vs_reference_identical": bool(torch.equal(yf, y_ref)),
                   # the unfused path's producer is Inductor's, which rounds once where eager torch rounds twice
                   "fused_vs_unfused_rel": rel(yf, yu)}
            for key in ("bf16", "unfused", "fused"):
                row[f"{key}_ms"] = graph_time([sv[key] for sv in seg])
            mode = aq.MODE_PAIRS if M == 1 else aq.MODE_FP8
            fused_quant, act_quant = quant_alone(kind, x, r, layers[0], mode)
            xin = seg[0]["pre"]()
            row["producer_alone_ms"] = graph_time([sv["pre"] for sv in seg])
            row["act_quant_alone_ms"] = graph_time([lambda: act_quant(xin)])
            row["fused_quant_alone_ms"] = graph_time([fused_quant])
            row["unfused_vs_bf16"] = row["bf16_ms"] / row["unfused_ms"]
            row["fused_vs_bf16"] = row["bf16_ms"] / row["fused_ms"]
            row["fused_vs_unfused"] = row["unfused_ms"] / row["fused_ms"]
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            result["rows"].append(row)
            del layers, seg
            torch.cuda.empty_cache()
            write_results(args.out, "norm-quant", result)
    print(markdown(result))


if __name__ == "__main__":
    main()
