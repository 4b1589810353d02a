"""Launch shapes of the one-pass FP8 act-quant: K = 14336 with and without its fused R4, or K = 4096 (GPU).

    python benchmarks/act_quant_sweep.py [--out DIR] [--k 14336 | --k 4096]

Issue 4's rotation target (the fused rotation adds at most 10 % to the activation
quantization) stood at +14 % for down_proj's K = 14336 with the in-register FWHT (kernels-h100.json,
eebf7f0: 134.2 us unrotated, 152.4 us with the Hadamard at M = 8192), +3 % at K = 4096. This
times, for each launch shape, the act-quant with no rotation (row kernel: rows per program x
warps), with the plain R4 Hadamard on tensor cores (round 14, `_act_quant_fp8_mma_kernel`, the
default: one row per program, warps swept) and by round 5's FWHT (`hadamard="fwht"`), each also
with SiLU-mul in its loads (what vLLM runs before down_proj since round 10). Checks: every launch
gives its variant's default bytes, and the default of every rotated variant against the torch
reference (E2M1 codes re-encoded in FP8, row exponents; rows of the M = 1024 input), so a wrong
fragment layout on the GPU shows as differences, not as a speed-up. Writes act-quant-sweep-<gpu>.json.
(Round 11 also tried rows split in power-of-two tiles, 448 = 256 + 128 + 64, against the padding:
slower at every launch shape but one; results/act-quant-sweep-split-h100.json.)
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
from vllm_brq.kernels import reference as ref  # noqa: E402
from vllm_brq.rotation import hadamard  # noqa: E402

LAUNCHES = ((1, 4), (1, 8), (1, 16), (2, 8), (2, 16))  # (rows per program, warps) of the row kernel
MMA_WARPS = (4, 8, 16)  # the tensor-core Hadamard kernel: one row per program


def _bytes(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _reference(inp, rot, silu):
    """(FP8 operand, row exponents) of the torch reference for the rotated variants."""
    x = ref.silu_mul_reference(inp) if silu else inp
    f, e = ref.fp8_reencode_reference(*ref.quantize_activation_reference(x, rot.r))
    return f.to(torch.float8_e4m3fn), e


K4096_LAUNCHES = [("row", bm, w) for bm in (1, 2, 4) for w in (2, 4, 8)]


def sweep_k4096(out_dir, gen) -> None:
    """o_proj's act-quant (K = 4096, no rotation): the row kernel's launch shapes (rows per program
    x warps), each checked against the default's bytes, next to a bare cast moving the same bytes
    (torch's bf16 -> e4m3 conversion: what any separate pass costs at least). Round 20 also timed the
    tensor-core Hadamard kernel's unit layout without the Hadamard (commit bf2c456, reverted: within
    a few % of these; results/act-quant-sweep-k4096-h100.json)."""
    K = 4096
    rows, same, floor = [], {}, {}
    for M in (8192, 4096, 1024):
        x = outlier_x(M, K, gen)
        want = aq.quantize_activation(x, None, aq.MODE_FP8, with_scale=True)
        floor[M] = round(graph_time([lambda x=x: x.to(torch.float8_e4m3fn)]) * 1e3, 2)
        for impl, bm, warps in K4096_LAUNCHES:
            def run(impl=impl, bm=bm, warps=warps, x=x):
                return aq.quantize_activation(x, None, aq.MODE_FP8, with_scale=True, fp8_impl=impl, block_m=bm,
                                              num_warps=warps)
            same[f"M={M} {impl} BM={bm} warps={warps}"] = all(
                torch.equal(_bytes(a), _bytes(b)) for a, b in zip(run(), want))
            us = graph_time([run]) * 1e3
            rows.append(dict(M=M, K=K, impl=impl, BM=bm, warps=warps, us=round(us, 2),
                             vs_cast=round(floor[M] / us, 3)))
            print(rows[-1], flush=True)
    default = {r["M"]: r for r in rows if (r["impl"], r["BM"], r["warps"]) == ("row", 2, 4)}
    best = {M: min((r for r in rows if r["M"] == M), key=lambda r: r["us"]) for M in default}
    print({M: (default[M]["us"], best[M]) for M in default})
    write_results(out_dir, "act-quant-sweep-k4096", {
        "rows": rows, "cast_us": floor, "default_row_2x4": default, "best": best,
        "identical_to_default": same})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--k", type=int, default=14336, choices=(14336, 4096),
                    help="14336: down_proj's input with and without R4 (default); 4096: o_proj's, unrotated")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    if args.k == 4096:
        sweep_k4096(args.out, gen)
        return
    K = 14336
    r4 = aq.Rotation.prepare(hadamard(32).float().cuda())
    rows, same, vs_reference = [], {}, {}
    for M in (8192, 1024):
        x = outlier_x(M, K, gen)
        gu = outlier_x(M, 2 * K, gen)
        variants = {"none": (x, None, False, "fwht"), "r4": (x, r4, False, "mma"), "r4_fwht": (x, r4, False, "fwht"),
                    "silu_r4": (gu, r4, True, "mma"), "silu_r4_fwht": (gu, r4, True, "fwht")}
        for vname, (inp, rot, silu, had) in variants.items():
            def run(bm=None, warps=None, inp=inp, rot=rot, silu=silu, had=had):
                return aq.quantize_activation(inp, rot, aq.MODE_FP8, with_scale=True, fp8_impl="row", silu=silu,
                                              block_m=bm, num_warps=warps, hadamard=had)
            want = run()
            if rot is not None and M == 1024:
                f0, e0 = _reference(inp, rot, silu)
                vs_reference[vname] = dict(code_bytes_differing=int((_bytes(want[0]) != _bytes(f0)).sum()),
                                           of=want[0].numel(), row_exponents_equal=bool(torch.equal(want[1], e0)))
                print(vname, vs_reference[vname], flush=True)
            launches = [(1, w) for w in MMA_WARPS] if had == "mma" and rot is not None else LAUNCHES
            for bm, warps in launches:
                got = run(bm, warps)
                same[f"M={M} {vname} BM={bm} warps={warps}"] = all(
                    torch.equal(_bytes(a), _bytes(b)) for a, b in zip(got, want))
                us = graph_time([lambda bm=bm, warps=warps: run(bm, warps)]) * 1e3
                rows.append(dict(M=M, K=K, variant=vname, BM=bm, warps=warps, us=round(us, 2)))
                print(rows[-1], flush=True)
    best = {}
    for r in rows:
        key = (r["M"], r["variant"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    default = {(r["M"], r["variant"]): r for r in rows if (r["BM"], r["warps"]) == (1, 8)}
    overhead = {f"M={M} {v}": {"default launch (1, 8)": round(default[(M, v)]["us"] / default[(M, "none")]["us"] - 1,
                                                              3),
                               "best of each": round(best[(M, v)]["us"] / best[(M, "none")]["us"] - 1, 3)}
                for M in (8192, 1024) for v in ("r4", "r4_fwht")}
    print(overhead)
    write_results(args.out, "act-quant-sweep", {"rows": rows, "rotation_overhead": overhead,
                                                "best": {f"M={k[0]} {k[1]}": v for k, v in best.items()},
                                                "identical_to_default_launch": same,
                                                "default_vs_reference_M1024": vs_reference})


if __name__ == "__main__":
    main()
