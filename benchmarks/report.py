"""Markdown tables for the README from the committed results files (no GPU needed).

    python benchmarks/report.py kernels benchmarks/results/kernels-h100.json
    python benchmarks/report.py bounds benchmarks/results/kernels-h100.json
    python benchmarks/report.py prefill-targets benchmarks/results/kernels-h100.json
    python benchmarks/report.py decode-targets benchmarks/results/stream-floor-probe-h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = ("qkv", "o", "gate_up", "down")


def kernels_table(path: Path) -> str:
    """W4A4 (and FP8 cuBLAS) time as a ratio to bf16 cuBLAS, per Llama-3-8B shape and M."""
    d = json.loads(path.read_text())
    rows = [r for r in d["rows"] if r["op"] in SHAPES]
    ms = sorted({r["M"] for r in rows})
    lines = [f"{d['device']}, torch {d['torch']}, triton {d['triton']}, {d['date'][:10]}; "
             "speed-up over cuBLAS bf16 (higher is better), same run:", "",
             "| shape (N x K) | backend | " + " | ".join(f"M={m}" for m in ms) + " |",
             "| --- | --- |" + " --- |" * len(ms)]
    for op in SHAPES:
        for backend, label in (("brq_w4a4", "brq W4A4"),
                               ("brq_w4a4_pdl1", "brq W4A4, rounds 6-7 decode (BRQ_PDL=1)"),
                               ("brq_w4a4_round5", "brq W4A4, round-5 decode (BRQ_PDL=0, BRQ_GEMV_PERSIST=0)"),
                               ("brq_w4a4_torchmm", "brq W4A4, BRQ_FP8_GEMM=torch"), ("brq_w4a16", "brq W4A16"),
                               ("brq_w4a16_triton", "brq W4A16, BRQ_W4A16_GEMM=triton"),
                               ("marlin_w4a4", "W4A4 as MXFP4 act-quant + vLLM Marlin (ref.)"),
                               ("vllm_marlin_w4a16", "vLLM MXFP4 Marlin W4A16 (ref.)"),
                               ("scaled_mm_fp8_rowwise", "FP8 cuBLAS (ref.)"),
                               ("vllm_cutlass_fp8", "FP8 vLLM CUTLASS (ref.)")):
            cells = {r["M"]: r for r in rows if r["op"] == op and r["backend"] == backend}
            if not cells:
                continue
            any_row = next(iter(cells.values()))
            shape = f"{op} ({any_row['N']}x{any_row['K']})"
            vals = [f"{cells[m]['ratio_vs_bf16']:.2f}x" if m in cells else "-" for m in ms]
            lines.append(f"| {shape} | {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _prefill_cells(d: dict):
    """(op, M, timings by backend, FP8 GEMM backend) of each prefill cell (M >= 1024) of a kernels
    results file that has bf16, the FP8 GEMM brq runs (vLLM's CUTLASS where the run had it, else
    cuBLAS via torch._scaled_mm) and brq W4A4."""
    for op in SHAPES:
        for m in (1024, 4096, 8192):
            t = {r["backend"]: r for r in d["rows"] if r["op"] == op and r["M"] == m}
            gemm = "vllm_cutlass_fp8" if "vllm_cutlass_fp8" in t else "scaled_mm_fp8_rowwise"
            if {"cublas_bf16", gemm, "brq_w4a4"} <= set(t):
                yield op, m, t, gemm


def prefill_bounds_table(path: Path) -> str:
    """Why W4A4 prefill (act-quant pass + FP8 GEMM) tops out where it does: the speed-up over
    bf16 if the GEMM ran as fast as the FP8 GEMM brq runs, timed alone (vLLM's CUTLASS where the
    run had it, else cuBLAS via torch._scaled_mm), and the act-quant took its measured time
    (the M = 8192 act-quant rows, scaled by M / 8192: it is bandwidth-bound), next to the
    measured one. Both from the same run."""
    d = json.loads(path.read_text())
    aq = {(r["op"], r["K"]): r["ms"] for r in d["rows"] if r["op"].startswith("act_quant_fp8_rot_") and r["M"] == 8192}
    lines = ["| shape | M | FP8 GEMM alone | FP8 GEMM + act-quant pass (sum of both timed alone) | brq W4A4 measured |",
             "| --- | --- | --- | --- | --- |"]
    for op, m, t, gemm in _prefill_cells(d):
        k = t["brq_w4a4"]["K"]
        # down_proj's input carries R4: the plain Hadamard brq-convert writes (signed in older files)
        rot = "none"
        if op == "down":
            rot = "r32plain" if ("act_quant_fp8_rot_r32plain", k) in aq else "r32sign"
        a = aq[(f"act_quant_fp8_rot_{rot}", k)] * m / 8192
        bf, f8 = t["cublas_bf16"]["ms"], t[gemm]["ms"]
        lines.append(f"| {op} | {m} | {bf / f8:.2f}x | {bf / (f8 + a):.2f}x | {t['brq_w4a4']['ratio_vs_bf16']:.2f}x |")
    return "\n".join(lines)


def prefill_targets_table(path: Path) -> str:
    """Issue 4's prefill target (W4A4 >= 1.5x bf16 at M >= 1024) per shape and M, and where it is
    missed, what it would take: the time 1.5x leaves for the act-quant pass next to the FP8 GEMM
    brq runs (timed alone), against that pass's floor, its bytes (2 read + 1 written per element)
    at the run's copy bandwidth, and against what the pass costs as dispatched (brq W4A4 minus the
    GEMM alone). A floor above the budget rules out any separate act-quant pass."""
    d = json.loads(path.read_text())
    lines = ["| shape | M | brq W4A4 | FP8 GEMM alone | act-quant budget for 1.5x (us) "
             "| its floor at copy bandwidth (us) | act-quant as dispatched (us) | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for op, m, t, gemm in _prefill_cells(d):
        k = t["brq_w4a4"]["K"]
        bf, f8, got = t["cublas_bf16"]["ms"], t[gemm]["ms"], t["brq_w4a4"]["ratio_vs_bf16"]
        act = (t["brq_w4a4"]["ms"] - f8) * 1e3
        budget = (bf / 1.5 - f8) * 1e3
        floor = m * k * 3 / (d["copy_GBps"] * 1e3)
        if got >= 1.5:
            verdict = "met"
        elif budget <= 0:
            verdict = "out of reach: the FP8 GEMM alone is below 1.5x"
        elif floor > budget:
            verdict = "out of reach for a separate act-quant pass (floor > budget)"
        else:
            verdict = f"needs the act-quant at {floor / budget:.0%} of copy bandwidth (as dispatched {floor / act:.0%})"
        lines.append(f"| {op} | {m} | {got:.2f}x | {bf / f8:.2f}x | {budget:.1f} | {floor:.1f} | {act:.1f} "
                     f"| {verdict} |")
    return "\n".join(lines)


def decode_targets_table(path: Path) -> str:
    """Issue 4's M = 1 target (3x bf16) per shape from benchmarks/stream_floor_probe.py: the linear
    as dispatched (act-quant + GEMV, the GEMV a programmatic dependent), the GEMV alone, gemv_a4's
    loads alone (its tiles, no math), the best pure read of the packed bytes, and the time 3x
    leaves above that read for everything else (quantizing the activation, the math, launches)."""
    d = json.loads(path.read_text())
    lines = ["| shape | bf16 (us) | as dispatched (act-quant + GEMV) | GEMV alone | gemv_a4's loads alone | best read "
             "| 3x target (us) | 3x minus best read (us) | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for op in SHAPES:
        r = d["per_shape_us"][op]
        bf, read, loads = r["cublas bf16"], r["flat read, best"]["us"], r["rows read BN=4 NBK=32 warps=4"]
        pair = r["act-quant + gemv_a4 (brq_linear, as dispatched)"]
        need = f"{read / (bf / 3):.0%} of the best read's speed"
        if bf / pair >= 3:
            verdict = "met"
        elif bf / loads < 3:
            verdict = f"out of reach with gemv_a4's tiles (their loads alone miss it); another kernel needs {need}"
        else:
            verdict = f"needs {need} (gemv_a4 alone: {read / r['gemv_a4']:.0%})"
        lines.append(f"| {op} | {bf:.1f} | {bf / pair:.2f}x | {bf / r['gemv_a4']:.2f}x | {bf / loads:.2f}x "
                     f"| {bf / read:.2f}x | {bf / 3:.2f} | {bf / 3 - read:.2f} | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["kernels", "bounds", "prefill-targets", "decode-targets"])
    p.add_argument("path", type=Path, help="kernels-<gpu>.json (decode-targets: stream-floor-probe-<gpu>.json)")
    args = p.parse_args(argv)
    table = {"kernels": kernels_table, "bounds": prefill_bounds_table, "prefill-targets": prefill_targets_table,
             "decode-targets": decode_targets_table}[args.kind]
    print(table(args.path))


if __name__ == "__main__":
    main()
