"""Launch shapes of the decode norm-fused act-quant (add + RMSNorm -> fp16 pairs), M = 1 (GPU).

    python benchmarks/norm_pairs_sweep.py [--out DIR]

In the decode chain the norm-fused act-quant before qkv costs ~2.4 us over the GEMV alone, the
plain act-quant ~0.6 us (norm-quant-h100.json, decode-layers-h100.json): at M = 1 it runs 8
programs (16 blocks each) of 4 warps, each summing the squares of the whole row first. This
times the segment "norm-pairs -> gemv_a4" (qkv, 32 layers' weights in one CUDA graph, as
bench_norm_quant.py) for each (blocks per program, warps), beside the plain act-quant + GEMV and
the GEMV alone on the same shape, and checks each launch's operand bit for bit against the
default. Writes norm-pairs-sweep-<gpu>.json.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, graph_time, outlier_x, write_results  # noqa: E402

from vllm_brq import mxfp4  # noqa: E402
from vllm_brq.kernels import act_quant as aq  # noqa: E402
from vllm_brq.kernels import dispatch, gemm  # noqa: E402
from vllm_brq.kernels import norm_quant as nq  # noqa: E402

EPS = 1e-5
LAUNCHES = list(itertools.product((2, 4, 8, 16, 32, 128), (1, 2, 4, 8, 16)))  # (blocks per program, warps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    N, K = SHAPES["qkv"]
    layers = [mxfp4.quantize(torch.randn(N, K, generator=gen, device="cuda") * 0.02) for _ in range(32)]
    norm_w = (torch.rand(K, generator=gen, device="cuda") + 0.5).bfloat16()
    x, r = outlier_x(1, K, gen), outlier_x(1, K, gen)

    def chain(fn):
        return graph_time([lambda: [fn(wp, ws) for wp, ws in layers]]) * 1e3 / len(layers)

    res = {"gemv_a4 alone": chain(lambda wp, ws, p=aq.quantize_activation(x, None, aq.MODE_PAIRS):
                                  gemm.gemv_a4(p[0], p[1], wp, ws, pdl=True)),
           "act-quant + gemv_a4 (dispatch)": chain(lambda wp, ws: dispatch.brq_linear(x, wp, ws, None, None, True))}
    want = nq.rms_norm_quantize(x, r, norm_w, EPS, aq.MODE_PAIRS)
    same = {}
    orig = nq.rms_norm_quantize
    for nb, warps in LAUNCHES:
        got = orig(x, r, norm_w, EPS, aq.MODE_PAIRS, nb=nb, num_warps=warps)
        same[f"nb={nb} warps={warps}"] = all(torch.equal(a, b) for a, b in zip(got, want))
        nq.rms_norm_quantize = functools.partial(orig, nb=nb, num_warps=warps)
        try:
            res[f"norm-pairs nb={nb} warps={warps} + gemv_a4 (dispatch)"] = chain(
                lambda wp, ws: dispatch.brq_norm_linear(x, r, norm_w, EPS, wp, ws, None, None, True)[0])
        finally:
            nq.rms_norm_quantize = orig
    res = {k: round(v, 2) for k, v in res.items()}
    for k, v in res.items():
        print(f"{v:7.2f} us  {k}", flush=True)
    write_results(args.out, "norm-pairs-sweep", {"shape": "qkv 6144x4096, M = 1", "us_per_layer": res,
                                                 "identical_to_default_launch": same})


if __name__ == "__main__":
    main()
