"""Does an L2 prefetch issued before a compute-only window speed up the decode GEMV after it? (GPU)

    python benchmarks/l2_prefetch_probe.py [--out DIR]

In a batch-1 decode step HBM sits idle for ~35 us per layer (rope, KV-cache write, attention,
norms, SiLU, act-quant: latency-bound kernels), while the brq GEMVs stream 116 MB per layer
from HBM at ~0.78 of copy bandwidth. The probe models one window as a spin kernel
(torch.cuda._sleep, no memory traffic) and asks, per Llama-3-8B decode weight, with 32
distinct layers' weights in one CUDA graph (so nothing is in L2 by accident):
  [sleep W] [gemv_a4 weight i]                          (the window idle, as now)
  [L2 prefetch of a fraction f of weight i] [sleep W] [gemv_a4 weight i]
The prefetch takes f of every 64 KB piece of the codes and scales (so prefetched and streamed
bytes mix evenly in the GEMV), issued two ways: one cp.async.bulk.prefetch.L2 per piece ("bulk",
the TMA unit) or one prefetch.global.L2 per 128-byte line ("lines").
Prints the GEMV's cost per call (replay time minus the same graph with the GEMV left out)
for each f and window, and writes l2-prefetch-probe-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, graph_time, outlier_x, write_results  # noqa: E402

from vllm_brq import mxfp4  # noqa: E402
from vllm_brq.kernels import act_quant as aq  # noqa: E402
from vllm_brq.kernels import dispatch, gemm  # noqa: E402

PIECE = 1 << 16
MODES = ("bulk", "lines")


@triton.jit
def _prefetch_kernel(base, nbytes, lo, hi, PIECE: tl.constexpr):
    """Program j: bulk-prefetch bytes [j * PIECE + lo, j * PIECE + hi) of [base, base + nbytes) into L2."""
    start = tl.program_id(0).to(tl.int64) * PIECE + lo
    n = tl.minimum(hi - lo, nbytes - start) // 16 * 16
    lane = tl.arange(0, 32)
    size = tl.where(lane == 0, n, 0).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [base + start + lane * 0, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_lines_kernel(base, nbytes, lo, hi, PIECE: tl.constexpr, LINES: tl.constexpr):
    """Program j: one prefetch.global.L2 per 128-byte line of [j * PIECE + lo, j * PIECE + hi)."""
    start = tl.program_id(0).to(tl.int64) * PIECE + lo
    offs = tl.arange(0, LINES).to(tl.int64) * 128
    ok = (offs < hi - lo) & (start + offs < nbytes)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [base + start + offs, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


def prefetch(t: torch.Tensor, frac: float, mode: str = "bulk") -> None:
    """Prefetch frac of every piece of t into L2: one bulk (TMA) prefetch per piece, or one
    prefetch.global.L2 per 128-byte line (mode "lines")."""
    nbytes = t.numel() * t.element_size()
    piece = PIECE if nbytes >= PIECE * 64 else max(256, PIECE // 16)  # scales: smaller pieces
    hi = int(piece * frac) // 16 * 16
    if hi <= 0:
        return
    grid = (triton.cdiv(nbytes, piece),)
    if mode == "bulk":
        _prefetch_kernel[grid](t.data_ptr(), nbytes, 0, hi, PIECE=piece, num_warps=1)
    else:
        _prefetch_lines_kernel[grid](t.data_ptr(), nbytes, 0, hi, PIECE=piece, LINES=piece // 128,
                                     num_warps=max(1, min(4, piece // 4096)))


def shape_rows(N: int, K: int, layers: int, cyc_per_us: float, gen) -> dict:
    """One weight shape: the GEMV cold, hot, and after each (window, prefetch mode, fraction)."""
    ws = [mxfp4.quantize(torch.randn(N, K, device="cuda", generator=gen) * 0.02) for _ in range(layers)]
    xp, xs = aq.quantize_activation(outlier_x(1, K, gen), None, aq.MODE_PAIRS)
    persist = dispatch.gemv_persistent(N, K)
    gemv = [lambda w=w: gemm.gemv_a4(xp, xs, w[0], w[1], persistent=persist) for w in ws]
    want = gemv[0]()
    rows = {"gemv alone (cold, back to back)": graph_time(gemv, reps=20) * 1e3,
            "gemv hot (same weight 32x)": graph_time([gemv[0]] * layers, reps=20) * 1e3}
    for win, mode, frac in [(w, m, f) for w in (4, 15) for m in MODES for f in (0.0, 0.25, 0.5, 1.0)
                            if m == MODES[0] or f]:
        cyc = int(win * cyc_per_us)

        def pf(i, frac=frac, mode=mode):
            if frac:
                prefetch(ws[i][0], frac, mode)
                prefetch(ws[i][1], frac, mode)
        base = graph_time([lambda i=i: (pf(i), torch.cuda._sleep(cyc)) for i in range(layers)], reps=20) * 1e3
        full = graph_time([lambda i=i: (pf(i), torch.cuda._sleep(cyc), gemv[i]()) for i in range(layers)],
                          reps=20) * 1e3
        rows[f"window {win} us, {mode} prefetch f={frac}: gemv us"] = full - base
        rows[f"window {win} us, {mode} prefetch f={frac}: prefetch+sleep us"] = base
    prefetch(ws[0][0], 1.0)
    prefetch(ws[0][1], 1.0)
    rows["outputs identical with prefetch"] = bool(torch.equal(gemv[0](), want))
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = graph_time([lambda: torch.cuda._sleep(200000)], reps=10)  # cycles per us of torch.cuda._sleep
    cyc_per_us = 200000 / (t * 1e3)
    res = {"sleep_cycles_per_us": round(cyc_per_us, 1)}
    for name, (N, K) in SHAPES.items():
        res[name] = shape_rows(N, K, args.layers, cyc_per_us, gen)
        print(name, json.dumps(res[name], indent=1), flush=True)
        torch.cuda.empty_cache()
    write_results(args.out, "l2-prefetch-probe", {"us_per_call": res})

if __name__ == "__main__":
    main()
