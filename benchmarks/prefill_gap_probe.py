"""Where W4A4 prefill's time goes, piece by piece, on brq's own operands (GPU).

    python benchmarks/prefill_gap_probe.py [--out DIR]

The kernel table (bench_kernels.py) times brq W4A4 prefill as dispatched and the FP8 GEMMs alone
on a plain cast of the activation (x.to(e4m3), unit scales). On down_proj the dispatched time
exceeds act-quant + GEMM alone by ~6 %, and at M = 8192 gate_up's cuBLAS FP8 GEMM
(torch._scaled_mm) alone beat vLLM's CUTLASS (1487 vs 1607 us) while act-quant + cuBLAS
as dispatched (BRQ_FP8_GEMM=torch) took 1726 us. This asks, per Llama-3-8B shape and prefill M,
in one run and one setting (CUDA graphs cycling over enough weight copies to defeat the L2):
the act-quant alone; each FP8 GEMM alone on the act-quant's own operand (E2M1 values re-encoded
in e4m3, power-of-two row scales) and on the plain cast; both dispatched routes; bf16 cuBLAS.
If a GEMM is slower on brq's operand than on the cast, the gap is the data, not the dispatch;
if act-quant + GEMM alone is below the dispatched time, the dispatch adds it.
Writes prefill-gap-probe-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import (L2_DEFEAT_BYTES, SHAPES, env_set, graph_time, outlier_x, vllm_cutlass,  # noqa: E402
                           write_results)

from vllm_brq import mxfp4  # noqa: E402
from vllm_brq.kernels import act_quant as aq  # noqa: E402
from vllm_brq.kernels import dispatch  # noqa: E402
from vllm_brq.rotation import hadamard  # noqa: E402


def probe_shape(name, N, K, M, gen, cutlass) -> dict:
    """Microseconds of each piece for one shape and M (see the module docstring)."""
    wp, ws = mxfp4.quantize(torch.randn(N, K, device="cuda", generator=gen) * 0.02)
    r = hadamard(32).float().cuda() if name == "down" else None  # R4 as brq-convert writes it
    ex = dispatch.prepare_extras(wp, ws, r)
    x = outlier_x(M, K, gen)
    per_copy = wp.numel() + ws.numel() + ex["weight_fp8"].numel() + x.numel() * 2
    n = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / per_copy)))
    exs = [(wp.clone(), ws.clone(), {k: v.clone() for k, v in ex.items()}) for _ in range(n)]
    rot = dispatch._rotation(r, ex.get("rotation_sign"))
    xf, _, xsc = aq.quantize_activation(x, rot, aq.MODE_FP8, with_scale=True, rounding=dispatch.act_rounding(),
                                        hadamard=dispatch.hadamard_impl())[:3]
    x8, ones = x.to(torch.float8_e4m3fn), torch.ones(M, 1, device="cuda")
    wbs = [mxfp4.dequantize(wp, ws, torch.bfloat16) for _ in range(max(1, min(16, math.ceil(
        L2_DEFEAT_BYTES / (N * K * 2 + x.numel() * 2)))))]

    def us(fns):
        return round(graph_time(fns) * 1e3, 1)

    t = {"bf16 cuBLAS": us([lambda w=w: torch.matmul(x, w.t()) for w in wbs])}
    del wbs
    t["act-quant alone"] = us([lambda: aq.quantize_activation(x, rot, aq.MODE_FP8, with_scale=True,
                                                              rounding=dispatch.act_rounding(),
                                                              hadamard=dispatch.hadamard_impl())])
    gemms = {"cuBLAS FP8": lambda a, sa, e: torch._scaled_mm(a, e["weight_fp8"].t(), scale_a=sa,
                                                             scale_b=e["weight_fp8_scale"], out_dtype=torch.bfloat16)}
    if cutlass is not None:
        gemms["CUTLASS FP8"] = lambda a, sa, e: cutlass(a, e["weight_fp8"].t(), sa, e["weight_fp8_scale"],
                                                        torch.bfloat16)
    for g, fn in gemms.items():
        t[f"{g} on brq's operand"] = us([lambda e=e, fn=fn: fn(xf, xsc, e) for _, _, e in exs])
        t[f"{g} on the plain cast"] = us([lambda e=e, fn=fn: fn(x8, ones, e) for _, _, e in exs])
    routes = {"torch": "cuBLAS FP8"} if cutlass is None else {"cutlass": "CUTLASS FP8", "torch": "cuBLAS FP8"}
    for choice, g in routes.items():
        with env_set("BRQ_FP8_GEMM", choice):
            t[f"brq W4A4 as dispatched ({g})"] = us(
                [lambda p=p, s=s, e=e: dispatch.brq_linear(x, p, s, r, None, True, **e) for p, s, e in exs])
        t[f"{g}: dispatched minus (act-quant + GEMM on brq's operand)"] = round(
            t[f"brq W4A4 as dispatched ({g})"] - t["act-quant alone"] - t[f"{g} on brq's operand"], 1)
        t[f"{g}: bf16 / dispatched"] = round(t["bf16 cuBLAS"] / t[f"brq W4A4 as dispatched ({g})"], 3)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--ms", default="1024,4096,8192")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    cutlass = vllm_cutlass()
    rows = {}
    for name, (N, K) in SHAPES.items():
        for M in (int(m) for m in args.ms.split(",")):
            rows[f"{name} M={M}"] = probe_shape(name, N, K, M, gen, cutlass)
            print(name, M, json.dumps(rows[f"{name} M={M}"]), flush=True)
            torch.cuda.empty_cache()
    write_results(args.out, "prefill-gap-probe", {"cutlass": cutlass is not None, "us": rows})


if __name__ == "__main__":
    main()
