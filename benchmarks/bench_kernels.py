"""Check and time the BRQ Triton kernels against cuBLAS bf16 and torch FP8 _scaled_mm (GPU).

    python benchmarks/bench_kernels.py [--check-only] [--smollm2 .gpu/smollm2_linears.pt] [--out DIR]

1. Correctness: act-quant codes/scales/FP8 operand vs the torch reference (mismatch counts);
   GEMMs vs the exact MXFP4 product (brq_linear_reference) on random data with outlier
   channels (x60) and massive outliers (x500), and on real SmolLM2 linears if given.
2. Speed, Llama-3-8B linear shapes at M in {1..8192}: every backend timed in the same run
   as CUDA-graph replays cycling over enough weight/input copies to defeat the 50 MB L2.
   Writes kernels-<gpu>.json (rows {op, M, N, K, backend, ms, bf16_ms, ratio_vs_bf16}).
   Timed beside the default path: brq_w4a4_round5 (M = 1 without PDL or the persistent GEMV),
   brq_w4a4_pdl1 (M = 1 with only the GEMV a programmatic dependent, BRQ_PDL=1),
   brq_gemv_a4_persist_only (the persistent kernel on every shape), brq_w4a16_triton (W4A16
   without Marlin, BRQ_W4A16_GEMM=triton), vllm_marlin_w4a16 (vLLM's MXFP4 Marlin alone: how
   vLLM serves MXFP4 on Hopper) and marlin_w4a4 (the MXFP4 act-quant, then Marlin: W4A4 on
   Marlin), where vLLM's Marlin loads, the FP8 act-quant with the
   rounding dispatch does not run (`_fast` rows while BRQ_ACT_ROUNDING is its default "bits") and, when
   vLLM is importable (PYTHONPATH with the kit; brq_w4a4 prefill then runs on vLLM's CUTLASS
   FP8 GEMM), vllm_cutlass_fp8 (that GEMM alone) and brq_w4a4_torchmm (BRQ_FP8_GEMM=torch).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
import triton

from vllm_brq import mxfp4
from vllm_brq.kernels import act_quant as aq
from vllm_brq.kernels import dispatch, gemm, marlin
from vllm_brq.kernels import reference as ref
from vllm_brq.rotation import block_rotation, hadamard, rotate

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
MS = (1, 4, 16, 64, 256, 1024, 4096, 8192)
L2_DEFEAT_BYTES = 256 << 20


def outlier_x(M, K, gen, dtype=torch.bfloat16):
    x = torch.randn(M, K, generator=gen, device="cuda")
    ch = torch.randperm(K, generator=gen, device="cuda")[: max(1, K // 128)]
    x[:, ch] *= 60
    x.view(-1)[torch.randint(0, M * K, (max(1, M * K // 100000),), generator=gen, device="cuda")] *= 500
    return x.to(dtype)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@contextlib.contextmanager
def env_set(name, value):
    """Run the dispatch with one of its environment switches set (BRQ_PDL, BRQ_FP8_GEMM, ...)."""
    old = os.environ.get(name)
    os.environ[name] = value
    dispatch._vllm_cutlass_scaled_mm.cache_clear()
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
        dispatch._vllm_cutlass_scaled_mm.cache_clear()


def vllm_cutlass():
    """vLLM's CUTLASS FP8 GEMM (what `--quantization fp8` runs) when vLLM is importable here."""
    with env_set("BRQ_FP8_GEMM", "cutlass"):
        return dispatch._vllm_cutlass_scaled_mm()


def pdl_pair_identical(x, r, wp, ws):
    """x written by a kernel -> act-quant (launch_dependents, and a dependent itself as BRQ_PDL=2
    runs it) -> gemv_a4 (pdl) gives the same bits as the plain pair."""
    xp0, xs0 = aq.quantize_activation(x, r, aq.MODE_PAIRS)
    want = gemm.gemv_a4(xp0, xs0, wp, ws)
    same = True
    for wait in (False, True):
        xw = x * 1  # written by the kernel just before the act-quant
        xp, xs = aq.quantize_activation(xw, r, aq.MODE_PAIRS, launch_dependents=True, pdl=wait)
        same &= bool(torch.equal(gemm.gemv_a4(xp, xs, wp, ws, pdl=True), want))
    return same


def persist_identical(xp, xs, wp, ws):
    """The persistent gemv_a4 (M = 1) gives the same bits as the one-tile-per-CTA kernel."""
    return bool(torch.equal(gemm.gemv_a4(xp, xs, wp, ws, persistent=True), gemm.gemv_a4(xp, xs, wp, ws)))


def check(log, smollm2_path, decode=False):
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    res = {}
    for K in (4096, 14336) if not decode else ():
        x = outlier_x(777, K, gen)
        for rname, r in (("none", None), ("shared", block_rotation(K, 32, 1, "c", shared=True).float()),
                         ("plain_hadamard", hadamard(32).float()), ("per_block", block_rotation(K, 32, 1, "c").float())):
            q0, s0 = ref.quantize_activation_reference(x, r)
            q, s = aq.quantize_activation(x, r, aq.MODE_MXFP4)
            f0, e0 = ref.fp8_reencode_reference(q0, s0)
            f, e = aq.quantize_activation(x, r, aq.MODE_FP8)
            d = aq.quantize_activation(x, r, aq.MODE_DEQUANT)
            d0 = mxfp4.dequantize(q0, s0, torch.bfloat16)
            a, sa = aq.quantize_activation(x, r, aq.MODE_PAIRS)
            a0, _ = ref.pairs_reference(q0, s0)
            key = f"act_quant K={K} rot={rname}"
            res[key] = dict(code_bytes_diff=int((q != q0).sum()), scale_diff=int((s != s0).sum()),
                            pairs_diff=int((a.view(torch.int16) != a0.view(torch.int16)).sum()),
                            pairs_scale_diff=int((sa != s0).sum()),
                            fp8_diff=int((f.float() != f0).sum()), rowexp_diff=int((e != e0).sum()),
                            dequant_diff=int((d != d0).sum()), elements=x.numel(),
                            fp8_flushed_blocks=int(((s0.int() - e0[:, None] - 127) < -14).sum()))
            # the +-1 bf16 rotation dot (Rotation.prepare) and the one-pass FP8 kernel
            rp = aq.Rotation.prepare(r) if r is not None else None
            if rp is not None:
                qs, ss = aq.quantize_activation(x, rp, aq.MODE_MXFP4)
                ds = aq.quantize_activation(x, rp, aq.MODE_DEQUANT)
                res[key].update(sign_rot=rp.sign is not None, sign_code_bytes_diff=int((qs != q0).sum()),
                                sign_scale_diff=int((ss != s0).sum()), sign_dequant_diff=int((ds != d0).sum()))
            if r is None or r.dim() == 2:
                for tag, rr, rounding in (("row", r, "fast"), ("row_sign", rp, "fast"), ("row_bits", r, "bits"),
                                          ("row_sign_bits", rp, "bits")):
                    if tag.startswith("row_sign") and rr is None:
                        continue
                    f1, e1, sc1 = aq.quantize_activation(x, rr, aq.MODE_FP8, with_scale=True, rounding=rounding)
                    res[key].update({f"{tag}_fp8_diff": int((f1.float() != f0).sum()),
                                     f"{tag}_rowexp_diff": int((e1 != e0).sum()),
                                     f"{tag}_scale_diff": int((sc1[:, 0] != torch.exp2((e0 - 6).double()).float()).sum())})
            log(key, res[key])
    cases = []
    for name, (N, K) in (("o", (1024, 4096)), ("down", (1024, 14336))):
        w = torch.randn(N, K, generator=gen, device="cuda") * 0.02
        wp, ws = mxfp4.quantize(w)
        r = block_rotation(K, 32, 2, name, shared=True).float()
        for M in (1, 4) if decode else (1, 16, 256, 1000):
            cases.append((f"random_{name} M={M}", outlier_x(M, K, gen), wp, ws, r))
    if smollm2_path and Path(smollm2_path).exists():
        for n, t in torch.load(smollm2_path).items():
            t = {k: v.cuda() for k, v in t.items()}
            for M in (1, 512):
                cases.append((f"smollm2 {n} M={M}", t["x"][:M], t["weight_packed"], t["weight_scale"], t["input_rotation"]))
    for key, x, wp, ws, r in cases:
        if decode and x.shape[0] > 4:
            continue
        y0 = ref.brq_linear_reference(x.float(), wp, ws, r, None, True).double()
        yb = y0.to(torch.bfloat16)
        xf, xe = aq.quantize_activation(x, r, aq.MODE_FP8)
        xd = aq.quantize_activation(x, r, aq.MODE_DEQUANT)
        xp, xs = aq.quantize_activation(x, r, aq.MODE_PAIRS)
        ex = dispatch.prepare_extras(wp, ws, r)
        bias = torch.randn(wp.shape[0], device="cuda", dtype=torch.bfloat16)
        yb0 = y0 + bias.double()
        a4_cfgs = {f"{c.kwargs['BN']}x{c.kwargs['NBK']}w{c.num_warps}": rel(gemm.gemv_a4(
            xp[:4], xs[:4], wp, ws, out_dtype=torch.float32, config=dict(c.kwargs, num_warps=c.num_warps)), y0[:4])
            for c in gemm._GEMV_A4_CONFIGS}
        if decode:
            a0, sa0 = ref.pairs_reference(*ref.quantize_activation_reference(x[:4], r))
            row = dict(bf16_rounding_of_exact=rel(yb, y0), gemv_a4_f32out_every_config_max=max(a4_cfgs.values()),
                       pairs_diff=int((xp[:4].view(torch.int16) != a0.view(torch.int16)).sum()),
                       pairs_scale_diff=int((xs[:4] != sa0).sum()),
                       dispatch_w4a4_extras=rel(dispatch.brq_linear(x, wp, ws, r, None, True, **ex), y0),
                       dispatch_w4a4_extras_bias=rel(dispatch.brq_linear(x, wp, ws, r, bias, True, **ex), yb0),
                       gemv_on_fakequant=rel(gemm.gemv(xd[:4], wp, ws), y0[:4]),
                       gemv_a4=rel(gemm.gemv_a4(xp[:4], xs[:4], wp, ws), y0[:4]),
                       gemv_a4_f32out=rel(gemm.gemv_a4(xp[:4], xs[:4], wp, ws, out_dtype=torch.float32), y0[:4]),
                       pdl_identical=pdl_pair_identical(x[:1], r, wp, ws),
                       persist_identical=persist_identical(xp[:1], xs[:1], wp, ws),
                       gemv_a4_asm_vs_pure_maxdiff=float((gemm.gemv_a4(xp[:4], xs[:4], wp, ws, use_asm=True).float()
                                                          - gemm.gemv_a4(xp[:4], xs[:4], wp, ws, use_asm=False).float()).abs().max()))
            res[key] = row
            log(key, {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()})
            continue
        row = dict(bf16_rounding_of_exact=rel(yb, y0), gemv_a4_f32out_every_config_max=max(a4_cfgs.values()),
                   dispatch_w4a4_extras=rel(dispatch.brq_linear(x, wp, ws, r, None, True, **ex), y0),
                   dispatch_w4a4_extras_bias=rel(dispatch.brq_linear(x, wp, ws, r, bias, True, **ex), yb0),
                   fp8_weight_flushed=int(dispatch.reencode_weights_fp8(wp, ws)[2]),
                   rotation_sign=("rotation_sign" in ex),
                   fp8_gemm=rel(gemm.w4a4_fp8(xf, xe, wp, ws), y0),
                   fp8_reference=rel(ref.brq_linear_fp8_reference(x.float(), wp, ws, r).double(), y0),
                   w4a16_on_fakequant=rel(gemm.w4a16(xd, wp, ws), y0),
                   dequant_exact=bool(torch.equal(gemm.dequantize(wp, ws), mxfp4.dequantize(wp, ws, torch.bfloat16))),
                   gemv_on_fakequant=rel(gemm.gemv(xd[:4], wp, ws), y0[:4]),
                   gemv_a4=rel(gemm.gemv_a4(xp[:4], xs[:4], wp, ws), y0[:4]),
                   gemv_a4_f32out=rel(gemm.gemv_a4(xp[:4], xs[:4], wp, ws, out_dtype=torch.float32), y0[:4]),
                   pdl_identical=pdl_pair_identical(x[:1], r, wp, ws),
                   persist_identical=persist_identical(xp[:1], xs[:1], wp, ws),
                   gemv_a4_asm_vs_pure_maxdiff=float((gemm.gemv_a4(xp[:4], xs[:4], wp, ws, use_asm=True).float()
                                                      - gemm.gemv_a4(xp[:4], xs[:4], wp, ws, use_asm=False).float()).abs().max()),
                   gemv_asm_vs_pure_maxdiff=float((gemm.gemv(xd[:4], wp, ws, use_asm=True).float()
                                                   - gemm.gemv(xd[:4], wp, ws, use_asm=False).float()).abs().max()),
                   dispatch_w4a4=rel(dispatch.brq_linear(x, wp, ws, r, None, True), y0),
                   dispatch_w4a16=rel(dispatch.brq_linear(x, wp, ws, r, None, False),
                                      ref.brq_linear_reference(x.float(), wp, ws, r, None, False).double()))
        if marlin.available():  # vLLM's MXFP4 Marlin: W4A16, and W4A4 on the exact MXFP4 activation
            N, K = wp.shape[0], wp.shape[1] * 2
            mw = marlin.prepare(wp, ws)
            mwb = marlin.prepare(wp, ws, bias)
            exm = dispatch.prepare_extras(wp, ws, r, quantize_activations=False, bias=bias)
            y16 = ref.brq_linear_reference(x.float(), wp, ws, r, None, False).double()
            row.update(dispatch_w4a16_marlin_bias=rel(dispatch.brq_linear(x, wp, ws, r, bias, False, **exm),
                                                      y16 + bias.double()),
                       dispatch_w4a16_fp16_not_marlin=rel(dispatch.brq_linear(x.half(), wp, ws, r, None, False, **exm), y16),
                       marlin_w4a4_on_fakequant=rel(marlin.linear(xd, N, K, **mw), y0),
                       marlin_w4a4_on_fakequant_bias=rel(marlin.linear(xd, N, K, **mwb), yb0),
                       marlin_w4a16=rel(marlin.linear(rotate(x, r) if r is not None else x, N, K, **mw), y16))
        if x.shape[0] > gemm.GEMV_MAX_M and vllm_cutlass() is not None:
            with env_set("BRQ_FP8_GEMM", "cutlass"):
                row["dispatch_w4a4_cutlass_bias"] = rel(dispatch.brq_linear(x, wp, ws, r, bias, True, **ex), yb0)
        res[key] = row
        log(key, {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()})
    return res


def graph_time(fns, reps=10):
    """Median ms per call of fns (a list cycled once per replay) captured in one CUDA graph."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    del g
    return sorted(times)[len(times) // 2]


def write_results(out_dir, stem: str, payload: dict) -> Path:
    """`payload` with the device, versions, date and command in front, as <stem>-<gpu>.json in
    out_dir (the small GPU scripts' results files)."""
    props = torch.cuda.get_device_properties(0)
    out = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), **payload}
    gpu = props.name.replace("NVIDIA ", "").split()[0].lower()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / f"{stem}-{gpu}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def copy_bandwidth():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() / ms / 1e6  # GB/s, read + write


def bench(log, only=None, ms_list=MS, act_quant=True, on_rows=lambda rows: None):
    """Time every backend; `on_rows(rows)` after each block of rows (partial results)."""
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbs = copy_bandwidth()
    log("copy bandwidth GB/s", round(copy_gbs))
    cutlass = vllm_cutlass()
    log("vLLM CUTLASS FP8 GEMM:",
        "available" if cutlass else "not importable (rows vllm_cutlass_fp8, brq_w4a4_torchmm skipped)")
    log("vLLM MXFP4 Marlin:", "available" if marlin.available() else "not importable (rows *marlin* skipped)")
    # activation quantization (the down_proj input, with and without the fused R4)
    for M, K in ((8192, 14336), (8192, 4096), (1, 14336)) if act_quant else ():
        x = outlier_x(M, K, gen)
        r = block_rotation(K, 32, 0, "b", shared=True).float().cuda()
        rp = aq.Rotation.prepare(r)
        rpb = aq.Rotation.prepare(block_rotation(K, 32, 0, "b").float().cuda())  # per-block +-1 R
        rpl = aq.Rotation.prepare(hadamard(32).float().cuda())  # brq-convert's R4 (signs folded into up_proj)
        c = torch.empty_like(x)
        base = graph_time([lambda: c.copy_(x)])
        for mode, mname, obytes in ((aq.MODE_FP8, "fp8", 1.0 + 8 / K), (aq.MODE_MXFP4, "mxfp4", 0.5 + 1 / 32),
                                    (aq.MODE_DEQUANT, "dequant", 2.0)):
            rots = (("none", None), ("r32", r), ("r32sign", rp), ("r32plain", rpl)) + (
                (("r32blksign", rpb),) if mode == aq.MODE_FP8 else ())
            rounding = dict(rounding=dispatch.act_rounding()) if mode == aq.MODE_FP8 else {}
            variants = [(rname, rr, rounding) for rname, rr in rots]
            if mode == aq.MODE_FP8:  # the rounding dispatch does not run (BRQ_ACT_ROUNDING), for comparison
                other = "fast" if rounding["rounding"] == "bits" else "bits"
                variants += [(f"{rname}_{other}", rr, dict(rounding=other)) for rname, rr in rots if rname != "r32"]
            for rname, rr, extra in variants:
                kw = dict(with_scale=True, **extra) if mode == aq.MODE_FP8 else {}
                ms = graph_time([lambda: aq.quantize_activation(x, rr, mode, **kw)])
                gbs = M * K * (2 + obytes) / ms / 1e6
                rows.append(dict(op=f"act_quant_{mname}_rot_{rname}", M=M, N=0, K=K, backend="triton", ms=ms,
                                 bf16_ms=None, ratio_vs_bf16=None, copy_ms=base, GBps=gbs,
                                 frac_of_copy_bw=gbs / copy_gbs))
                log(rows[-1]["op"], M, K, f"{ms * 1e3:.1f} us", f"{gbs:.0f} GB/s", f"{gbs / copy_gbs:.2f} of copy")
    for shape, (N, K) in SHAPES.items():
        if only and shape not in only:
            continue
        w = torch.randn(N, K, device="cuda", generator=gen) * 0.02
        wp, ws = mxfp4.quantize(w)
        wb = mxfp4.dequantize(wp, ws, torch.bfloat16)
        r = hadamard(32).float().cuda() if shape == "down" else None  # R4 as brq-convert writes it
        ex = dispatch.prepare_extras(wp, ws, r)
        w8, sw8 = ex["weight_fp8"], ex["weight_fp8_scale"]  # the faithful FP8 re-encoding
        del w
        for M in ms_list:
            x = outlier_x(M, K, gen)
            packed_bytes = wp.numel() + ws.numel()
            n4 = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / (packed_bytes + x.numel() * 2))))
            n48 = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / (packed_bytes + w8.numel() + x.numel() * 2))))
            n16 = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / (wb.numel() * 2 + x.numel() * 2))))
            n8 = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / (wb.numel() + x.numel()))))
            wps = [(wp.clone(), ws.clone()) for _ in range(n4)]
            mws = [dispatch.prepare_extras(p, s, quantize_activations=False) for p, s in wps] if marlin.available() else []
            wbs = [wb.clone() for _ in range(n16)]
            w8s = [w8.clone() for _ in range(n8)]
            x8 = x.to(torch.float8_e4m3fn)
            sx8 = torch.ones(M, 1, device="cuda")
            bf16_ms = graph_time([lambda wi=wi: torch.matmul(x, wi.t()) for wi in wbs])
            t = {"cublas_bf16": bf16_ms}
            try:
                t["scaled_mm_fp8_rowwise"] = graph_time([lambda wi=wi: torch._scaled_mm(
                    x8, wi.t(), scale_a=sx8, scale_b=sw8, out_dtype=torch.bfloat16) for wi in w8s])
            except RuntimeError as exc:  # cuBLAS rowwise FP8 refuses some shapes (e.g. M=1)
                log("scaled_mm failed", shape, M, str(exc)[:120])
            if cutlass is not None and M > gemm.GEMV_MAX_M:  # vLLM's FP8 GEMM (when vLLM is installed)
                t["vllm_cutlass_fp8"] = graph_time([lambda wi=wi: cutlass(x8, wi.t(), sx8, sw8, torch.bfloat16)
                                                   for wi in w8s])
            exs = [(wp.clone(), ws.clone(), {k: v.clone() for k, v in ex.items()}) for _ in range(n48)]
            t["brq_w4a4"] = graph_time([lambda p=p, s=s, e=e: dispatch.brq_linear(x, p, s, r, None, True, **e)
                                        for p, s, e in exs])
            if M == 1:  # round 5's decode path (no PDL, never persistent): what the defaults gain
                with env_set("BRQ_PDL", "0"), env_set("BRQ_GEMV_PERSIST", "0"):
                    t["brq_w4a4_round5"] = graph_time([lambda p=p, s=s, e=e: dispatch.brq_linear(
                        x, p, s, r, None, True, **e) for p, s, e in exs])
                with env_set("BRQ_PDL", "1"):  # only the GEMV a programmatic dependent (rounds 6-7)
                    t["brq_w4a4_pdl1"] = graph_time([lambda p=p, s=s, e=e: dispatch.brq_linear(
                        x, p, s, r, None, True, **e) for p, s, e in exs])
            if cutlass is not None and M > gemm.GEMV_MAX_M:  # BRQ_FP8_GEMM=torch: act-quant + torch._scaled_mm
                with env_set("BRQ_FP8_GEMM", "torch"):
                    t["brq_w4a4_torchmm"] = graph_time([lambda p=p, s=s, e=e: dispatch.brq_linear(
                        x, p, s, r, None, True, **e) for p, s, e in exs])
            del exs
            if M == 1024:  # BRQ_FP8_WEIGHTS=0: packed weights only (in-register FP8 kernel)
                t["brq_w4a4_packed_only"] = graph_time([lambda p=p, s=s: dispatch.brq_linear(x, p, s, r, None, True)
                                                        for p, s in wps])
            if mws:  # vLLM's MXFP4 Marlin: W4A16 on x, and W4A4 = the exact MXFP4 activation (act-quant) + Marlin
                xr = rotate(x, r) if r is not None else x
                t["vllm_marlin_w4a16"] = graph_time([lambda m=m: marlin.linear(xr, N, K, **m) for m in mws])  # vLLM's MXFP4 path
                t["marlin_w4a4"] = graph_time([lambda m=m: marlin.linear(
                    aq.quantize_activation(x, r, aq.MODE_DEQUANT), N, K, **m) for m in mws])
            # W4A16 as dispatched (x already rotated: the rotation is the same torch op on every path)
            t["brq_w4a16"] = graph_time([lambda p=p, s=s, m=m: dispatch.brq_linear(x, p, s, None, None, False, **m)
                                         for (p, s), m in zip(wps, mws or [{}] * len(wps))])
            if mws:  # without Marlin (BRQ_W4A16_GEMM=triton): the Triton gemv / GEMMs, dequantize + cuBLAS
                t["brq_w4a16_triton"] = graph_time([lambda p=p, s=s: dispatch.brq_linear(x, p, s, None, None, False)
                                                    for p, s in wps])
            if M > dispatch.SMALL_M:  # dequantize + cuBLAS here without Marlin; BRQ_W4A16_DEQUANT=0 runs this kernel
                t["brq_w4a16_inregister"] = graph_time([lambda p=p, s=s: gemm.w4a16(x, p, s) for p, s in wps])
            if M <= gemm.GEMV_MAX_M:
                xd = aq.quantize_activation(x, r, aq.MODE_DEQUANT)
                t["brq_gemv_only"] = graph_time([lambda p=p, s=s: gemm.gemv(xd, p, s) for p, s in wps])
                xp, xs = aq.quantize_activation(x, r, aq.MODE_PAIRS)
                t["brq_gemv_a4_only"] = graph_time([lambda p=p, s=s: gemm.gemv_a4(xp, xs, p, s) for p, s in wps])
                if M == 1:  # the persistent kernel on every shape (the dispatch takes it for N >= PERSIST_MIN_N)
                    t["brq_gemv_a4_persist_only"] = graph_time([lambda p=p, s=s: gemm.gemv_a4(
                        xp, xs, p, s, persistent=True) for p, s in wps])
            for backend, ms in t.items():
                row = dict(op=shape, M=M, N=N, K=K, backend=backend, ms=ms, bf16_ms=bf16_ms,
                           ratio_vs_bf16=bf16_ms / ms)
                if M <= 16:
                    nbytes = {"cublas_bf16": wb.numel() * 2, "scaled_mm_fp8_rowwise": wb.numel(),
                              "vllm_cutlass_fp8": wb.numel()}.get(backend, packed_bytes)
                    if backend in ("brq_w4a4", "brq_w4a4_torchmm") and M > gemm.GEMV_MAX_M:
                        nbytes = w8.numel()  # FP8 weight copy
                    row["weight_GBps"] = nbytes / ms / 1e6
                    row["frac_of_copy_bw"] = row["weight_GBps"] / copy_gbs
                rows.append(row)
            log(shape, M, " ".join(f"{b}={ms * 1e3:.1f}us({bf16_ms / ms:.2f}x)" for b, ms in t.items()))
            on_rows(rows)
            del wps, wbs, w8s, mws
        torch.cuda.empty_cache()
    return rows, copy_gbs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--smollm2", default=".gpu/smollm2_linears.pt")
    ap.add_argument("--shapes", nargs="*")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--decode", action="store_true",
                    help="quick iteration: M=1/4 rows only, no act-quant table, no autotuned prefill checks; "
                         "writes decode-<gpu>.json (never the committed kernels-<gpu>.json)")
    args = ap.parse_args()
    lines = []

    def log(*a):
        s = " ".join(str(v) for v in a)
        print(s, flush=True)
        lines.append(s)

    props = torch.cuda.get_device_properties(0)
    gpu = props.name.replace("NVIDIA ", "").split()[0].lower()
    meta = dict(device=props.name, capability=list(torch.cuda.get_device_capability()), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(sys.argv))
    log(meta)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"{'decode' if args.decode else 'kernels'}-{gpu}.json"
    partial = path.with_suffix(".partial.json")

    def save(dest, **parts):  # a run cut by a device time limit still leaves what it measured
        dest.write_text(json.dumps(dict(meta, **parts), indent=1))

    checks = check(log, args.smollm2, decode=args.decode)
    save(partial, checks=checks)
    out = dict(checks=checks)
    if not args.check_only:
        rows, copy_gbs = bench(log, args.shapes, ms_list=(1, 4) if args.decode else MS, act_quant=not args.decode,
                               on_rows=lambda rows: save(partial, checks=checks, rows=rows))
        out.update(copy_GBps=copy_gbs, rows=rows)
    save(path, **out)
    partial.unlink(missing_ok=True)
    log("wrote", path)


if __name__ == "__main__":
    main()
