"""The FP8 lm_head (`brq-convert --lm-head fp8`) against the bf16 head, Llama-3-8B's 4096 -> 128256.

At batch 1 the bf16 head is the largest single read of a decode step (1.05 GB; vLLM's decode
profile: 0.37 of 3.25 ms on the H100). The FP8 head reads half of it: the input split into two
FP8 terms per token (kernels/fp8_head.py) + the FP8 GEMM over both (`dispatch.fp8_linear`:
vLLM's CUTLASS scaled_mm where vLLM imports, else torch._scaled_mm). Checks first (codes and
scales bit-identical to the reference, the head against the float64 product of the same
operands and against the bf16-input product), then per M the time of the bf16 head (cuBLAS),
the FP8 head as dispatched, each FP8 GEMM alone over the 2M rows and the act-quant alone, as
32-call CUDA graphs (the 0.5-1 GB weights never fit in L2).

    python benchmarks/bench_head.py --out benchmarks/results     # ~30 s on an H100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import graph_time, outlier_x, rel, vllm_cutlass, write_results  # noqa: E402

from vllm_brq.kernels import dispatch, fp8_head  # noqa: E402
from vllm_brq.kernels import reference as ref  # noqa: E402

N, K = 128256, 4096
MS = (1, 4, 16, 64, 256)


def checks(w8, ws, gen) -> dict:
    x = outlier_x(256, K, gen)
    q, s = fp8_head.quantize_split(x)
    q0, s0 = ref.fp8_split_reference(x)
    y = dispatch.fp8_linear(x[:16], w8, ws)
    q16, s16 = ref.fp8_split_reference(x[:16])
    y2 = (q16.double() @ w8.double().t()) * s16.double() * ws.double()[None]
    wd = w8.double() * ws.double()[:, None]
    return {"act_quant_code_differences": int((q.view(torch.uint8) != q0.view(torch.uint8)).sum()),
            "act_quant_scale_differences": int((s != s0).sum()),
            "gemm_rel_err_vs_float64": rel(y, y2[:16] + y2[16:]),
            "rel_err_vs_bf16_input": rel(y, x[:16].double() @ wd.t())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(N, K, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
    w8, ws = ref.fp8_head_weights_reference(w)
    result = {"shape": {"N": N, "K": K}, "checks": checks(w8, ws, gen)}
    print(json.dumps(result["checks"]), flush=True)
    cutlass = vllm_cutlass()
    rows = []
    for M in MS:
        x = outlier_x(M, K, gen)
        q, s = fp8_head.quantize_split(x)
        wsr = ws.reshape(1, -1)
        timed = {"bf16_cublas": lambda: torch.nn.functional.linear(x, w),
                 "fp8_head": lambda: dispatch.fp8_linear(x, w8, ws),
                 "act_quant_alone": lambda: fp8_head.quantize_split(x),
                 "fp8_gemm_torch": lambda: torch._scaled_mm(q, w8.t(), scale_a=s, scale_b=wsr, out_dtype=x.dtype)}
        if cutlass is not None:
            timed["fp8_gemm_cutlass"] = lambda: cutlass(q, w8.t(), s, wsr, x.dtype, None)
        ms = {name: graph_time([f] * 32) for name, f in timed.items()}
        for name, t in ms.items():
            weight_bytes = N * K * (2 if name == "bf16_cublas" else 1) + (4 * N if name != "bf16_cublas" else 0)
            rows.append({"M": M, "backend": name, "ms": t, "bf16_ms": ms["bf16_cublas"],
                         "ratio_vs_bf16": ms["bf16_cublas"] / t,
                         "weight_TBps": None if name == "act_quant_alone" else weight_bytes / t / 1e9})
            print(json.dumps(rows[-1]), flush=True)
    result["fp8_gemm_in_dispatch"] = "vllm cutlass_scaled_mm" if cutlass is not None else "torch._scaled_mm"
    result["rows"] = rows
    print(write_results(args.out, "head", result))


if __name__ == "__main__":
    main()
