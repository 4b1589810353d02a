"""W4A4 at 2 <= M <= 64 (several concurrent decodes): the packed weights or the FP8 copy? (GPU)

    python benchmarks/small_m_probe.py [--layers 16] [--ms 2,4,8,16,32,64] [--out DIR]

Until this probe, a W4A4 linear at M = 2-64 ran the prefill route: act-quant to the FP8 operand,
then an FP8 GEMM over the 8-bit weight copy (vLLM's CUTLASS), reading twice the bytes of the
packed weights, where vLLM's own FP8 GEMM at the same M is the bar (kernels-h100.json at M = 16:
brq W4A4 1.38-1.70x bf16, CUTLASS FP8 alone 1.78-1.86x). `gemm.w4a4_small` reads the packed
weights instead and decodes them in registers to the copy's values (fp16 tensor cores, the same
products). Per Llama-3-8B decode shape and M, over `--layers` distinct weights in one CUDA graph
(cold weights, as in a decode step), it times:

  cublas_bf16           torch.matmul on bf16 weights (the issue's baseline)
  vllm_cutlass_fp8      vLLM's FP8 GEMM alone on a pre-quantized e4m3 activation (FP8 mode's GEMM)
  vllm_marlin_w4a16     vLLM's MXFP4 Marlin (W4A16, bf16 activations; the same packed bytes)
  brq_w4a4_fp8copy      dispatch with BRQ_W4A4_SMALL=0: act-quant + FP8 GEMM over the copy
  brq_w4a4_small        dispatch as it is: act-quant + w4a4_small where W4A4_SMALL_MAX_M allows
  w4a4_small_only       w4a4_small alone on the pre-quantized operand: autotuned, and each config
                        of gemm._W4A4_MMA_CONFIGS pinned

and checks on the GPU: w4a4_small against the FP8 route's exact product
(`brq_linear_fp8_reference`, float64, a flushed weight block and x500 activation outliers
included) and against the CUTLASS route's output. Writes small-m-probe-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, env_set, graph_time, outlier_x, rel, vllm_cutlass, write_results  # noqa: E402

from vllm_brq import mxfp4  # noqa: E402
from vllm_brq.kernels import act_quant as aq  # noqa: E402
from vllm_brq.kernels import dispatch, gemm, marlin  # noqa: E402
from vllm_brq.kernels import reference as ref  # noqa: E402
from vllm_brq.rotation import hadamard, rotate  # noqa: E402


def checks(gen) -> dict:
    """w4a4_small vs the FP8 route's exact product and vs the dispatched FP8-copy route."""
    out = {}
    for shape, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device="cuda", generator=gen) * 0.02
        w[7, :32] *= 2.0 ** -18  # a block flushed by the FP8 copy (and so by w4a4_small)
        wp, ws = mxfp4.quantize(w)
        r = hadamard(32).float().cuda() if shape == "down" else None
        ex = dispatch.prepare_extras(wp, ws, r)
        b = torch.randn(N, device="cuda").bfloat16()
        for M in (2, 16, 64):
            x = outlier_x(M, K, gen)
            exact = ref.brq_linear_fp8_reference(x.float(), wp, ws, r, b.float()).double()
            xf, _, xsc = aq.quantize_activation(x, aq.Rotation.prepare(r) if r is not None else None, aq.MODE_FP8,
                                                with_scale=True)
            y32 = gemm.w4a4_small(xf, xsc, wp, ws, ex["weight_fp8_scale"], b, out_dtype=torch.float32)
            y = dispatch.brq_linear(x, wp, ws, r, b, True, **ex)
            with env_set("BRQ_W4A4_SMALL", "0"):
                y_copy = dispatch.brq_linear(x, wp, ws, r, b, True, **ex)
            out[f"{shape} M={M}"] = {"small_fp32_vs_exact": rel(y32.double(), exact),
                                     "small_dispatched_vs_exact": rel(y.double(), exact),
                                     "fp8copy_dispatched_vs_exact": rel(y_copy.double(), exact),
                                     "small_vs_fp8copy": rel(y.double(), y_copy.double())}
            print(shape, M, out[f"{shape} M={M}"], flush=True)
    return out


def timings(layers: int, ms: list[int], gen) -> list[dict]:
    cutlass = vllm_cutlass()
    rows = []
    for shape, (N, K) in SHAPES.items():
        r = hadamard(32).float().cuda() if shape == "down" else None
        weights = []
        for _ in range(layers):
            wp, ws = mxfp4.quantize(torch.randn(N, K, device="cuda", generator=gen) * 0.02)
            weights.append((wp, ws, dispatch.prepare_extras(wp, ws, r),
                            dispatch.prepare_extras(wp, ws, quantize_activations=False) if marlin.available() else {}))
        wbs = [torch.randn(N, K, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
               for _ in range(max(2, layers // 4))]  # 4x the bytes per weight: fewer copies defeat L2 as well
        for M in ms:
            x = outlier_x(M, K, gen)
            rot = aq.Rotation.prepare(r) if r is not None else None
            xf, _, xsc = aq.quantize_activation(x, rot, aq.MODE_FP8, with_scale=True)
            x8, sx8 = x.to(torch.float8_e4m3fn), torch.ones(M, 1, device="cuda")
            t = {"cublas_bf16": graph_time([lambda wb=wb: torch.matmul(x, wb.t()) for wb in wbs], reps=20)}
            if cutlass is not None:
                t["vllm_cutlass_fp8"] = graph_time([lambda e=e: cutlass(x8, e["weight_fp8"].t(), sx8,
                                                                        e["weight_fp8_scale"], torch.bfloat16)
                                                    for _, _, e, _ in weights], reps=20)
            if weights[0][3]:
                xr = rotate(x, r) if r is not None else x
                t["vllm_marlin_w4a16"] = graph_time([lambda m=m: marlin.linear(xr, N, K, **m)
                                                     for _, _, _, m in weights], reps=20)
            with env_set("BRQ_W4A4_SMALL", "0"):
                t["brq_w4a4_fp8copy"] = graph_time([lambda p=p, s=s, e=e: dispatch.brq_linear(x, p, s, r, None, True, **e)
                                                    for p, s, e, _ in weights], reps=20)
            t["brq_w4a4_small"] = graph_time([lambda p=p, s=s, e=e: dispatch.brq_linear(x, p, s, r, None, True, **e)
                                              for p, s, e, _ in weights], reps=20)
            t["w4a4_small_only"] = graph_time([lambda p=p, s=s, e=e: gemm.w4a4_small(
                xf, xsc, p, s, e["weight_fp8_scale"]) for p, s, e, _ in weights], reps=20)
            for c in gemm._W4A4_MMA_CONFIGS:
                cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                label = f"w4a4_small_only BN={cfg['BN']} NBK={cfg['NBK']} w={c.num_warps} st={c.num_stages}"
                try:
                    t[label] = graph_time([lambda p=p, s=s, e=e: gemm.w4a4_small(
                        xf, xsc, p, s, e["weight_fp8_scale"], config=cfg) for p, s, e, _ in weights], reps=20)
                except Exception as exc:  # a config the GPU refuses (shared memory): recorded, not fatal
                    t[label] = None
                    print(label, "failed:", repr(exc)[:200], flush=True)
            packed = (N * K // 2 + N * K // 32)
            bf16 = t["cublas_bf16"]
            for backend, ms_ in t.items():
                if ms_ is None:
                    continue
                rows.append(dict(op=shape, M=M, N=N, K=K, backend=backend, ms=ms_, bf16_ms=bf16,
                                 ratio_vs_bf16=bf16 / ms_, packed_GBps=packed / ms_ / 1e6))
            print(shape, M, " ".join(f"{k}={v * 1e3:.1f}us({bf16 / v:.2f}x)" for k, v in t.items() if v), flush=True)
        del weights, wbs
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--ms", default="2,4,8,16,32,64")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"checks": checks(gen), "small_max_m": dispatch.W4A4_SMALL_MAX_M}
    if not args.check_only:
        result["rows"] = timings(args.layers, [int(m) for m in args.ms.split(",")], gen)
        result["autotuner_picks"] = {str(k): str(v) for k, v in gemm._w4a4_mma_kernel.cache.items()}
    path = write_results(args.out, "small-m-probe", result)
    print(json.dumps(result.get("autotuner_picks", {}), indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
