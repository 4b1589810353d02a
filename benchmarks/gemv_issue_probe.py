"""How much of the decode GEMV's time is instruction issue? (GPU)

    python benchmarks/gemv_issue_probe.py [--out DIR]

gemv_a4 spends ~121 SASS instructions per 32-block per thread, ~76 of them turning the 8
nibbles of each weight word into fp16 pairs (shifts and masks). Issue alone is then ~25 us
per Llama-3-8B layer (6.8 M blocks x 121 / 32 per warp / ~1.05 T warp instructions/s)
against ~60 us measured, so whether cheaper decoding pays depends on how much issue
overlaps the weight stream. This times gemv_a4 (cold weights, 32 layers in one CUDA graph,
per shape) with the block dot replaced by two cheaper decodes, each in its own process
(the PTX is a module constant that Triton reads at compile time):
  current  the shipped decode (shifts/masks to fp16 E2M1 * 2^-14)
  e4m3     E2M1 -> e4m3 bytes (shift + mask) and cvt.rn.f16x2.e4m3x2: ~9 instead of ~19 per word
  floor    one AND per fp16 pair: a speed floor for any decode (wrong values)
Beside them, torch's int32 sum over the same packed codes (cold and hot): a generic reduction
of the same bytes, for scale (measured 3-4x slower than gemv_a4 on the H100: not a floor).
The outputs of e4m3/floor are not the product (the activation order is the current one):
only their speed is measured. Writes gemv-issue-probe-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, graph_time, outlier_x, write_results  # noqa: E402

from vllm_brq import mxfp4  # noqa: E402
from vllm_brq.kernels import act_quant as aq  # noqa: E402
from vllm_brq.kernels import dispatch, gemm  # noqa: E402

E4M3_WORD = """
    shl.b32 t, $WORD, 2; and.b32 t, t, 0x1C1C1C1C; shl.b32 u, $WORD, 4; and.b32 u, u, 0x80808080; or.b32 t, t, u;
    mov.b32 {lo, hi}, t; cvt.rn.f16x2.e4m3x2 d0, lo; cvt.rn.f16x2.e4m3x2 d1, hi;
    shr.b32 t, $WORD, 2; and.b32 t, t, 0x1C1C1C1C; and.b32 u, $WORD, 0x80808080; or.b32 t, t, u;
    mov.b32 {lo, hi}, t; cvt.rn.f16x2.e4m3x2 d2, lo; cvt.rn.f16x2.e4m3x2 d3, hi;
"""
FLOOR_WORD = """
    and.b32 d0, $WORD, 0x0E000E00; and.b32 d1, $WORD, 0x00E000E0; and.b32 d2, $WORD, 0xE000E000;
    and.b32 d3, $WORD, 0x000E000E;
"""


def use_decode(variant: str) -> None:
    """Make gemv_a4 compile with `variant`'s block dot (before its first compile in this process)."""
    word = {"current": None, "e4m3": E4M3_WORD, "floor": FLOOR_WORD}[variant]
    if word:
        gemm.BLOCK_DOT_ASM = tl.constexpr(gemm._block_dot_asm(word))


def measure(variant: str, layers: int) -> dict:
    use_decode(variant)
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {}
    for name, (N, K) in SHAPES.items():
        ws = [mxfp4.quantize(torch.randn(N, K, device="cuda", generator=gen) * 0.02) for _ in range(layers)]
        xp, xs = aq.quantize_activation(outlier_x(1, K, gen), None, aq.MODE_PAIRS)
        persist = dispatch.gemv_persistent(N, K)
        for label, cfg in (("autotuned", None), ("BN=4 NBK=32 warps=4", dict(BN=4, NBK=32, num_warps=4, num_stages=1))):
            fns = [lambda w=w: gemm.gemv_a4(xp, xs, w[0], w[1], persistent=persist and cfg is None, config=cfg)
                   for w in ws]
            res[f"{name} {label}"] = round(graph_time(fns, reps=20) * 1e3, 2)
            res[f"{name} {label}, hot"] = round(graph_time([fns[0]] * layers, reps=20) * 1e3, 2)
        if variant == "current":  # torch's generic reduction of the same bytes
            red = [lambda w=w: w[0].view(torch.int32).sum() for w in ws]
            res[f"{name} torch int32 sum of the codes"] = round(graph_time(red, reps=20) * 1e3, 2)
            res[f"{name} torch int32 sum of the codes, hot"] = round(graph_time([red[0]] * layers, reps=20) * 1e3, 2)
        del ws
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--variant")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.layers)))
        return
    res = {}
    for variant in ("current", "e4m3", "floor"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--layers", str(args.layers)],
                             capture_output=True, text=True)
        if out.returncode:
            res[variant] = {"error": out.stderr[-2000:]}
        else:
            res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(variant, json.dumps(res[variant], indent=1), flush=True)
    write_results(args.out, "gemv-issue-probe", {"us_per_call": res})


if __name__ == "__main__":
    main()
