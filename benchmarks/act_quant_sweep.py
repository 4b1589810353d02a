"""Launch shapes of the one-pass FP8 act-quant at K = 14336, with and without its fused R4 (GPU).

    python benchmarks/act_quant_sweep.py [--out DIR]

Issue 4's rotation target (the fused rotation adds at most 10 % to the activation
quantization) stands at +14 % for down_proj's K = 14336 (kernels-h100.json, eebf7f0: 134.2 us
unrotated, 152.4 us with the in-register Hadamard at M = 8192), +3 % at K = 4096. The row
kernel holds a whole row per program (448 blocks padded to 512) in 8 warps (16 with SiLU-mul,
since round 11); this times it for each (rows per program, warps) with no rotation, the R4
Hadamard, and the R4 Hadamard with SiLU-mul in its loads (what vLLM runs before down_proj
since round 10), so the default launch shape is picked where it runs. Codes are checked bit
for bit against the default launch. Writes act-quant-sweep-<gpu>.json. (Round 11 also tried
rows split in power-of-two tiles, 448 = 256 + 128 + 64, against the padding: slower at every
launch shape but one; results/act-quant-sweep-split-h100.json.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import graph_time, outlier_x, write_results  # noqa: E402

from vllm_brq.kernels import act_quant as aq  # noqa: E402
from vllm_brq.rotation import hadamard  # noqa: E402

LAUNCHES = ((1, 4), (1, 8), (1, 16), (2, 8), (2, 16))  # (rows per program, warps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    K = 14336
    r4 = aq.Rotation.prepare(hadamard(32).float().cuda())
    rows, same = [], {}
    for M in (8192, 1024):
        x = outlier_x(M, K, gen)
        gu = outlier_x(M, 2 * K, gen)
        variants = {"none": (x, None, False), "r4": (x, r4, False), "silu_r4": (gu, r4, True)}
        for vname, (inp, rot, silu) in variants.items():
            want = aq.quantize_activation(inp, rot, aq.MODE_FP8, with_scale=True, fp8_impl="row", silu=silu)
            for bm, warps in LAUNCHES:
                def run(bm=bm, warps=warps):
                    return aq.quantize_activation(inp, rot, aq.MODE_FP8, with_scale=True, fp8_impl="row", silu=silu,
                                                  block_m=bm, num_warps=warps)
                got = run()
                same[f"M={M} {vname} BM={bm} warps={warps}"] = all(
                    torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b) for a, b in zip(got, want))
                us = graph_time([run]) * 1e3
                rows.append(dict(M=M, K=K, variant=vname, BM=bm, warps=warps, us=round(us, 2)))
                print(rows[-1], flush=True)
    best = {}
    for r in rows:
        key = (r["M"], r["variant"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    default = {(r["M"], r["variant"]): r for r in rows if (r["BM"], r["warps"]) == (1, 8)}  # none and r4
    overhead = {f"M={M}": {"default launch (1, 8)": round(default[(M, "r4")]["us"] / default[(M, "none")]["us"] - 1, 3),
                           "best of each": round(best[(M, "r4")]["us"] / best[(M, "none")]["us"] - 1, 3),
                           "best r4 vs default none": round(best[(M, "r4")]["us"] / default[(M, "none")]["us"] - 1, 3)}
                for M in (8192, 1024)}
    print(overhead)
    write_results(args.out, "act-quant-sweep", {"rows": rows, "rotation_overhead": overhead,
                                                "best": {f"M={k[0]} {k[1]}": v for k, v in best.items()},
                                                "identical_to_default_launch": same})


if __name__ == "__main__":
    main()
