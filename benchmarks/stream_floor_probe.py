"""How fast can any one kernel stream a decode linear's packed weights? (GPU)

    python benchmarks/stream_floor_probe.py [--layers 32] [--out DIR]

Issue 4's M = 1 target (3x cuBLAS bf16) and issue 6's batch-1 latency both come down to how
fast the decode GEMV reads 4.25 bits per weight. gemv_a4 fits t = 2.6 us + bytes / 2.36 TB/s
per launch (rounds 8-9), and neither cheaper math, more bytes in flight nor TMA moved it. This
probe asks what a kernel that does nothing but read the same bytes achieves, in the same
setting (32 layers' distinct weights, one CUDA graph, cold: the weights stream from HBM):

  gemv_a4       the shipped decode GEMV (activation quantized before the graph; one-shot or
                persistent as dispatch runs it), plain launches and as programmatic dependents
  rows read     gemv_a4's exact access pattern (BN rows x NBK blocks per program, two tiles in
                flight, weights and scales), without the activation and the math
  flat read     the packed weights + scales as one contiguous buffer, each program reading
                contiguous chunks with 16-byte loads, U loads in flight per thread, STEPS
                unrolled; one program per chunk or a grid-stride loop over 4 x SMs programs
  empty         an empty kernel per layer (the graph's per-launch floor)
  as dispatched the W4A4 linear at M = 1 as dispatch.brq_linear runs it (act-quant, R4's Hadamard
                on down_proj, then gemv_a4: two launches, the GEMV a programmatic dependent)
  cuBLAS bf16   torch.matmul of one bf16 row by the bf16 weight (the issue's baseline)

If the best read is no faster than gemv_a4, the GEMV sits on the streaming floor of one launch
per linear, and bf16 / read bounds what any such decode kernel can reach at M = 1. Per shape
the probe also writes what issue 4's 3x target leaves above the best read and above gemv_a4's
own loads: the time any design has for quantizing the activation, the math and extra launches.
Writes stream-floor-probe-<gpu>.json.
"""

from __future__ import annotations

import argparse
import itertools
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
from vllm_brq.rotation import hadamard  # noqa: E402


@triton.jit
def _flat_read_kernel(src, out, n_words, n_chunks, U: tl.constexpr, T: tl.constexpr, STEPS: tl.constexpr):
    """XOR of every int32 word of src; program pid reads chunks pid, pid + nprog, ... of
    STEPS x U x T x 4 words (each load instruction: T x 16 contiguous bytes)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, U)[:, None] * (T * 4) + tl.arange(0, T * 4)[None, :]
    acc = tl.zeros([U, T * 4], dtype=tl.int32)
    for c in range(pid, n_chunks, tl.num_programs(0)):
        base = (pid.to(tl.int64) + (c - pid)) * (STEPS * U * T * 4)  # int64 offsets (c is an int in the interpreter)
        for s in tl.static_range(STEPS):
            o = base + s * (U * T * 4) + offs
            acc ^= tl.load(src + o, mask=o < n_words, other=0)
    tl.store(out + pid, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


@triton.jit
def _rows_read_kernel(w_ptr, ws_ptr, out_ptr, N, K, stride_wn, stride_sn, BN: tl.constexpr, NBK: tl.constexpr,
                      USE_ASM: tl.constexpr):
    """gemv_a4's loads alone: the same tiles, the same order, two tiles in flight."""
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_b = tl.arange(0, NBK)
    KB = K // 32
    w_tile = w_ptr + rows[:, None, None] * stride_wn + offs_b[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    s_tile = ws_ptr + rows[:, None] * stride_sn + offs_b[None, :]
    p, s = gemm._w_tile_load(w_tile, s_tile, 0, KB, NBK, offs_b, True, USE_ASM)
    p1, s1 = gemm._w_tile_load(w_tile, s_tile, NBK, KB, NBK, offs_b, True, USE_ASM)
    accp = tl.zeros([BN, NBK, 4], dtype=tl.int32)
    accs = tl.zeros([BN, NBK], dtype=tl.int32)
    for kb in range(0, KB, NBK):
        p2, s2 = gemm._w_tile_load(w_tile, s_tile, kb + 2 * NBK, KB, NBK, offs_b, True, USE_ASM)
        accp ^= p
        accs += s
        p, s, p1, s1 = p1, s1, p2, s2
    red = tl.xor_sum(tl.xor_sum(accp, axis=2), axis=1) + tl.sum(accs, axis=1)
    tl.store(out_ptr + offs_n, red, mask=offs_n < N)


@triton.jit
def _empty_kernel(out):
    if tl.program_id(0) < 0:  # never: the launch alone
        tl.store(out, 0)


def flat_read(buf: torch.Tensor, out: torch.Tensor, warps: int, U: int, steps: int, programs: int | None):
    words = buf.view(torch.int32)
    chunk = steps * U * warps * 32 * 4
    n_chunks = triton.cdiv(words.numel(), chunk)
    grid = (min(n_chunks, programs) if programs else n_chunks,)
    _flat_read_kernel[grid](words, out, words.numel(), n_chunks, U=U, T=warps * 32, STEPS=steps,
                            num_warps=warps, num_stages=1)


def rows_read(wp, ws, out, BN=4, NBK=32, warps=4):
    N, K = wp.shape[0], wp.shape[1] * 2
    w32 = wp.view(torch.int32)
    _rows_read_kernel[(triton.cdiv(N, BN),)](w32, ws, out, N, K, w32.stride(0), ws.stride(0), BN=BN, NBK=NBK,
                                            USE_ASM=not gemm._interpreting(), num_warps=warps, num_stages=1)


def fit(points: list[tuple[float, float]]) -> dict:
    """Least squares t = a + bytes / bw over (bytes, us) points."""
    xs, ys = torch.tensor([p[0] for p in points], dtype=torch.float64), torch.tensor([p[1] for p in points],
                                                                                    dtype=torch.float64)
    A = torch.stack([torch.ones_like(xs), xs], 1)
    a, b = torch.linalg.lstsq(A, ys[:, None]).solution[:, 0].tolist()
    return {"fixed_us": round(a, 2), "stream_TB_s": round(1e-6 / b, 3) if b > 0 else None,
            "residuals_us": [round(float(r), 2) for r in (ys - (a + b * xs)).tolist()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    sms = aq.sm_count(torch.device("cuda"))
    L = args.layers

    def timed(fns):
        return round(graph_time([lambda: [f() for f in fns]], reps=20) * 1e3 / len(fns), 2)

    out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")
    res = {"empty kernel, 1 program": timed([lambda: _empty_kernel[(1,)](out)] * L),
           "empty kernel, 1024 programs": timed([lambda: _empty_kernel[(1024,)](out)] * L)}
    per_shape, fits = {}, {}
    flat_cfgs = list(itertools.product((4, 8), (4, 8), (1, 4), (None, 4 * sms)))
    for name, (N, K) in SHAPES.items():
        ws = [mxfp4.quantize(torch.randn(N, K, device="cuda", generator=gen) * 0.02) for _ in range(L)]
        nbytes = ws[0][0].numel() + ws[0][1].numel()
        bufs = [torch.cat([wp.view(-1), sc.view(-1)]) for wp, sc in ws]
        xp, xs = aq.quantize_activation(outlier_x(1, K, gen), None, aq.MODE_PAIRS)
        how = dict(persistent=dispatch.gemv_persistent(N, K), oneshot=dispatch.gemv_oneshot(N, K))  # as dispatched
        r = {"bytes": nbytes,
             "gemv_a4": timed([lambda w=w: gemm.gemv_a4(xp, xs, w[0], w[1], **how) for w in ws]),
             "gemv_a4, PDL": timed([lambda w=w: gemm.gemv_a4(xp, xs, w[0], w[1], pdl=True, **how)
                                    for w in ws]),
             "gemv_a4 BN=2 NBK=32 warps=2": timed(
                 [lambda w=w: gemm.gemv_a4(xp, xs, w[0], w[1], config=dict(BN=2, NBK=32, num_warps=2, num_stages=1))
                  for w in ws]),
             "gemv_a4 BN=4 NBK=32 warps=4": timed(
                 [lambda w=w: gemm.gemv_a4(xp, xs, w[0], w[1], config=dict(BN=4, NBK=32, num_warps=4, num_stages=1))
                  for w in ws]),
             "rows read BN=4 NBK=32 warps=4": timed([lambda w=w: rows_read(w[0], w[1], out) for w in ws]),
             "rows read BN=2 NBK=32 warps=2": timed([lambda w=w: rows_read(w[0], w[1], out, 2, 32, 2)
                                                     for w in ws])}
        # the W4A4 linear at M = 1 as served: act-quant (+ R4 on down, as brq-convert writes it) + gemv_a4
        r4 = hadamard(32).float().cuda() if name == "down" else None
        sign = {"rotation_sign": aq.Rotation.prepare(r4).sign} if r4 is not None else {}
        x1 = outlier_x(1, K, gen)
        r["act-quant + gemv_a4 (brq_linear, as dispatched)"] = timed(
            [lambda w=w: dispatch.brq_linear(x1, w[0], w[1], r4, None, True, **sign) for w in ws])
        flat = {}
        for warps, U, steps, programs in flat_cfgs:
            label = f"flat read warps={warps} U={U} STEPS={steps} programs={'chunks' if programs is None else programs}"
            flat[label] = timed([lambda b=b, c=(warps, U, steps, programs): flat_read(b, out, *c) for b in bufs])
        best = min(flat, key=flat.get)
        r.update(flat)
        r["flat read, best"] = {"config": best, "us": flat[best]}
        del ws, bufs
        torch.cuda.empty_cache()
        wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(L)]
        xb = outlier_x(1, K, gen)
        r["cublas bf16"] = timed([lambda w=w: torch.matmul(xb, w.t()) for w in wb])
        del wb
        torch.cuda.empty_cache()
        for key in ("gemv_a4", "gemv_a4, PDL", "rows read BN=4 NBK=32 warps=4"):
            r[f"{key}: TB/s"] = round(nbytes / r[key] / 1e6, 3)
        r["flat read, best: TB/s"] = round(nbytes / flat[best] / 1e6, 3)
        r["bf16 / gemv_a4"] = round(r["cublas bf16"] / r["gemv_a4"], 3)
        r["bf16 / best read (the M = 1 ceiling of a one-kernel decode)"] = round(r["cublas bf16"] / flat[best], 3)
        r["bf16 / as dispatched"] = round(r["cublas bf16"] / r["act-quant + gemv_a4 (brq_linear, as dispatched)"], 3)
        # issue 4's M = 1 target: 3x bf16. What it leaves above the bytes' best read for everything else
        # (quantizing the activation, the GEMV's math, a second launch: compare the empty kernel above)
        r["3x target (us)"] = round(r["cublas bf16"] / 3, 2)
        r["3x target minus best read (us)"] = round(r["cublas bf16"] / 3 - flat[best], 2)
        loads = r["rows read BN=4 NBK=32 warps=4"]
        r["3x target minus gemv_a4's loads alone (us)"] = round(r["cublas bf16"] / 3 - loads, 2)
        per_shape[name] = r
        print(name, json.dumps(r, indent=1), flush=True)
    for key in ("gemv_a4", "gemv_a4, PDL", "rows read BN=4 NBK=32 warps=4", "rows read BN=2 NBK=32 warps=2"):
        fits[key] = fit([(r["bytes"], r[key]) for r in per_shape.values()])
    fits["flat read, best per shape"] = fit([(r["bytes"], r["flat read, best"]["us"]) for r in per_shape.values()])
    res.update({"sms": sms, "layers": L, "per_shape_us": per_shape, "fits_t_eq_a_plus_bytes_over_bw": fits})
    print(json.dumps(fits, indent=1))
    write_results(args.out, "stream-floor-probe", res)


if __name__ == "__main__":
    main()
