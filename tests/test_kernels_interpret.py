"""Triton kernels vs their references under Triton's CPU interpreter (TRITON_INTERPRET=1).

The interpreter must be switched on before triton is imported, so each check runs this
file in a subprocess. Small shapes, random inputs with outlier channels (x60) and massive
outliers (x500), a fresh seed each run (printed on failure). Known interpreter limit
(triton 3.9): bf16 tl.dot multiplies raw bit patterns, so the W4A16 kernel is checked here
with float32 activations (bf16 is checked on the GPU by benchmarks/bench_kernels.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECKS = ("act_quant", "act_quant_fp8_row", "norm_quant", "silu_quant", "gemm_fp8", "gemm_w4a16", "gemv", "gemv_a4", "dequant",
          "fp8_head_split")


@pytest.mark.parametrize("name", CHECKS)
def test_kernel_under_interpreter(name):
    pytest.importorskip("triton")
    seed = int.from_bytes(os.urandom(4), "little")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, __file__, name, str(seed)], env=env, capture_output=True, text=True,
                         timeout=300)
    if res.returncode == 77:
        pytest.skip(res.stdout.strip()[-300:])
    assert res.returncode == 0, f"seed {seed}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


def _inputs(seed, M, K, N):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:3]] *= 60
    x.view(-1)[torch.randint(0, M * K, (2,), generator=g)] *= 500
    w = torch.randn(N, K, generator=g) * 0.02
    w[torch.randint(0, N, (1,), generator=g), :32] *= 2.0 ** -18  # a weight block flushed by the FP8 path
    return x.bfloat16(), w


def _run(name, seed):
    import torch

    from vllm_brq import mxfp4
    from vllm_brq.kernels import act_quant as aq
    from vllm_brq.kernels import gemm
    from vllm_brq.kernels import reference as ref
    from vllm_brq.rotation import block_rotation, hadamard

    M, K, N = 5, 192, 48
    x, w = _inputs(seed, M, K, N)
    rots = (None, block_rotation(K, 32, seed, "s", shared=True).float(), block_rotation(K, 32, seed, "b").float())
    if name == "act_quant":
        for r in rots:
            q0, s0 = ref.quantize_activation_reference(x, r)
            q, s = aq.quantize_activation(x, r, aq.MODE_MXFP4, nb=2)
            assert torch.equal(q, q0) and torch.equal(s, s0)
            d = aq.quantize_activation(x, r, aq.MODE_DEQUANT, nb=2)
            assert torch.equal(d, mxfp4.dequantize(q0, s0, torch.bfloat16))
            f, e = aq.quantize_activation(x, r, aq.MODE_FP8, nb=2)
            f0, e0 = ref.fp8_reencode_reference(q0, s0)
            assert torch.equal(f.float(), f0) and torch.equal(e, e0)
            a, sa = aq.quantize_activation(x, r, aq.MODE_PAIRS, nb=2)
            a0, sa0 = ref.pairs_reference(q0, s0)
            assert torch.equal(a.view(torch.int16), a0.view(torch.int16)) and torch.equal(sa, sa0)
        return
    if name == "norm_quant":  # RMSNorm (+ residual) fused into the FP8 and decode act-quants
        # float16: the interpreter truncates float32 -> bf16 on stores (triton 3.9), the GPU rounds
        from vllm_brq.kernels import norm_quant as nq

        xh = x.half()
        res = (torch.randn(M, K, generator=torch.Generator().manual_seed(seed + 1)) * 4).half()
        nw = (torch.rand(K, generator=torch.Generator().manual_seed(seed + 2)) + 0.5).half()
        # R1 online: the signed Hadamard (FWHT in MODE_FP8, the +-1 dot in MODE_PAIRS), the plain one
        # (brq-convert's online R1: signs folded into the norm weight), a float32 R (the tf32x3 dot)
        online = (aq.Rotation.prepare(rots[1], dtype=torch.float16), aq.Rotation.prepare(hadamard(32).float()), rots[1])
        for r, rot in [(None, None), (res, None)] + [(res, o) for o in online]:
            n0, r0 = ref.rms_norm_reference(xh, r, nw, 1e-5)
            f0, e0, c0 = aq.quantize_activation(n0, rot, aq.MODE_FP8, with_scale=True)
            f, e, c, ro = nq.rms_norm_quantize(xh, r, nw, 1e-5, aq.MODE_FP8, input_rotation=rot)
            p0, s0 = aq.quantize_activation(n0, rot, aq.MODE_PAIRS)
            p, s, ro2 = nq.rms_norm_quantize(xh, r, nw, 1e-5, aq.MODE_PAIRS, input_rotation=rot)
            assert (ro is None) == (r is None) and (r is None or (torch.equal(ro, r0) and torch.equal(ro2, r0)))
            # the float32 sum of squares runs in another order than torch's mean: a code may move on a tie
            assert (f.float() != f0.float()).sum() <= 2 and torch.equal(e, e0) and torch.equal(c, c0), type(rot)
            assert (p.view(torch.int16) != p0.view(torch.int16)).sum() <= 2 and (s != s0).sum() <= 1, type(rot)
            for nb in (2, 4):  # other launch shapes (norm_pairs_sweep.py): the same operand
                got = nq.rms_norm_quantize(xh, r, nw, 1e-5, aq.MODE_PAIRS, nb=nb, num_warps=8, input_rotation=rot)
                assert torch.equal(got[0], p) and torch.equal(got[1], s), nb
        return
    if name == "silu_quant":  # SiLU-mul of gate_up computed in the act-quant's loads (down_proj's input)
        gu = torch.cat([x.half(), (x.float().flip(0) * 0.5).half()], 1)  # [M, 2K], outliers in both halves
        xs = ref.silu_mul_reference(gu)
        for r in (None, aq.Rotation.prepare(rots[1], dtype=torch.float16), aq.Rotation.prepare(hadamard(32).float())):
            for mode in (aq.MODE_PAIRS, aq.MODE_MXFP4):
                got, want = aq.quantize_activation(gu, r, mode, silu=True), aq.quantize_activation(xs, r, mode)
                assert all((g != w).sum() <= 2 for g, w in zip(got, want)), mode  # exp: a tie may move a code
            got = aq.quantize_activation(gu, r, aq.MODE_FP8, with_scale=True, silu=True, fp8_impl="row")
            want = aq.quantize_activation(xs, r, aq.MODE_FP8, with_scale=True, fp8_impl="row")
            assert (got[0].float() != want[0].float()).sum() <= 2 and torch.equal(got[1], want[1])
        return
    if name == "act_quant_fp8_row":  # one-pass FP8 mode, tf32x3 and +-1 (Rotation.prepare) rotations
        # row 0, block 0 (scale 2^0 from the 6): every E2M1 tie, both signs, the clamp, +-0
        ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 6.0, 0.0, 0.125, 4.5, 2.75, 1.5, 0.5, 3.0]
        x[0, :32] = torch.tensor(ties + [-v for v in ties], dtype=torch.bfloat16)
        rh = aq.Rotation.prepare(rots[1])  # diag(D) H32: the row kernels' FWHT
        rp = aq.Rotation.prepare(rots[1].roll(1, 0))  # +-1 but not diag(s) H32: the dot
        rpl = aq.Rotation.prepare(hadamard(32).float())  # brq-convert's R4: the FWHT without its sign pass
        assert rh.hadamard and not rp.hadamard and not aq.Rotation.prepare(rots[2]).hadamard
        assert rpl.hadamard and rpl.plain and not rh.plain
        for r in (None, rots[1], rh, rpl, aq.Rotation(rh.r, rh.sign[0]), rp, aq.Rotation.prepare(rots[2])):
            rr = r.r if isinstance(r, aq.Rotation) else r
            q0, s0 = ref.quantize_activation_reference(x, rr)
            f0, e0 = ref.fp8_reencode_reference(q0, s0)
            if isinstance(r, aq.Rotation):
                assert r.sign is not None
                q, s = aq.quantize_activation(x, r, aq.MODE_MXFP4, nb=2)
                assert torch.equal(q, q0) and torch.equal(s, s0)
            impls = ("row", "persist", "two_phase") if rr is None or rr.dim() == 2 else ("two_phase",)
            for impl, rounding in [(i, "fast") for i in impls] + [(impls[0], "bits"), (impls[-1], "compare")]:
                # persist with 1 program: it walks every row tile, prefetching the next
                kw = dict(programs_per_sm=1, block_m=2) if impl == "persist" else {}
                kw.update(nb=2) if impl == "two_phase" else None
                f, e, sc = aq.quantize_activation(x, r, aq.MODE_FP8, with_scale=True, fp8_impl=impl,
                                                  rounding=rounding, **kw)
                assert torch.equal(sc[:, 0], torch.exp2((e0 - 6).double()).float()), (impl, rounding)
                assert torch.equal(f.float(), f0) and torch.equal(e, e0), (impl, rounding)
                # byte-identical: no -0 where the reference has +0
                assert torch.equal(f.view(torch.uint8), f0.to(torch.float8_e4m3fn).view(torch.uint8)), (impl, rounding)
            f, e = aq.quantize_activation(x, r, aq.MODE_FP8, nb=2, fp8_impl="walk")
            assert torch.equal(f.float(), f0) and torch.equal(e, e0)
        # the plain R4 takes the tensor-core Hadamard kernel (its [units, 8] layout; the FWHT here),
        # or the row kernel's FWHT: the same bytes, in both 16-bit dtypes, K = 160 a partial 8-block group
        for xx in (x, x.half(), x[:, :160].contiguous()):
            f0, e0 = ref.fp8_reencode_reference(*ref.quantize_activation_reference(xx, rpl.r))
            for had in ("mma", "fwht"):
                f, e, sc = aq.quantize_activation(xx, rpl, aq.MODE_FP8, with_scale=True, fp8_impl="row", hadamard=had)
                assert torch.equal(f.view(torch.uint8), f0.to(torch.float8_e4m3fn).view(torch.uint8)), had
                assert torch.equal(e, e0) and torch.equal(sc[:, 0], torch.exp2((e0 - 6).double()).float()), had
        try:
            aq.quantize_activation(x, rpl, aq.MODE_FP8, hadamard="tensor")
            raise AssertionError("an unknown hadamard implementation was accepted")
        except ValueError as exc:
            assert "hadamard must be 'mma' or 'fwht'" in str(exc)
        return
    wp, ws = mxfp4.quantize(w)
    r = rots[1]
    if name == "fp8_head_split":  # the FP8 lm_head's two-term act-quant: bit-identical to the reference
        from vllm_brq.kernels import fp8_head

        g = torch.Generator().manual_seed(seed)
        outliers = torch.randn(3, 2500, generator=g) * torch.rand(3, 2500, generator=g) ** 8 * 500
        xs = [x.float(), outliers]  # K = 2500: three chunks, the last partial
        grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        grid = grid[torch.isfinite(grid) & (grid.abs() < 448)].sort().values
        ties = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, -grid])  # every code, midpoint and -0
        xs.append(ties[None] / 2)  # max 224: scale 1, so the hi values are the codes themselves
        xs.append(torch.tensor([[255.9, 256.0, 1e-30, 0.0], [3e38, 1.0, -2.0, 0.0]]))  # scale edges
        xs.append(torch.zeros(2, 64))  # an all-zero row keeps a finite scale (2^-120)
        for xx in xs:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                xd = xx.to(dtype)
                if not torch.isfinite(xd).all():
                    continue
                q, sc = fp8_head.quantize_split(xd)
                q0, s0 = ref.fp8_split_reference(xd)
                assert torch.equal(sc, s0), dtype
                assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)), (dtype, xx.shape)
        return
    if name == "dequant":  # exact: bit-identical to the spec, partial tiles and extreme scales included
        ws_x = ws.clone()
        ws_x[0, 0], ws_x[1, 1], ws_x[2, 2] = 0, 254, 1
        # the interpreter flushes bf16 subnormals (scale codes 0 and 1): extremes in float32 only
        for dtype, scales in ((torch.float32, ws_x), (torch.bfloat16, ws)):
            for bn, bk in ((16, 64), (32, 256)):  # K = 192: a partial K tile at BK = 256
                d = gemm.dequantize(wp, scales, dtype, block_n=bn, block_k=bk)
                assert torch.equal(d, mxfp4.dequantize(wp, scales, dtype)), (dtype, bn, bk)
        return
    if name == "gemv_a4":  # K/32 = 6: NBK 2 runs unmasked tiles, NBK 4 masked ones; BN 32 clamps rows
        xp, xs = aq.quantize_activation(x[:3], r, aq.MODE_PAIRS, nb=2)
        b = torch.randn(N)
        for m in (1, 3):  # M = 1: the one-shot kernel (3 or 2 tiles at once), M = 3: the two-tile loop
            y0 = ref.brq_linear_reference(x[:m].float(), wp, ws, r, None, True).double()
            for cfg in (dict(BN=4, NBK=2), dict(BN=32, NBK=4)):
                y = gemm.gemv_a4(xp[:m], xs[:m], wp, ws, bias=b, out_dtype=torch.float32, config=cfg)
                assert ((y.double() - b.double() - y0).norm() / y0.norm()) < 1e-5, (m, cfg)
                if m == 1:  # one-shot: the same block sums in the same order as the loop over the same tiles
                    assert torch.equal(gemm.gemv_a4(xp[:1], xs[:1], wp, ws, bias=b, out_dtype=torch.float32,
                                                    oneshot=False, config=cfg), y), cfg
        # NBK 1: 6 tiles, past the one-shot limit, so the loop; each thread sums its blocks in another
        # order than NBK 2's, so equal only up to float32 rounding (seed 1497816571 differs in the last bit)
        y1 = gemm.gemv_a4(xp[:1], xs[:1], wp, ws, bias=b, out_dtype=torch.float32, config=dict(BN=4, NBK=2))
        y6 = gemm.gemv_a4(xp[:1], xs[:1], wp, ws, bias=b, out_dtype=torch.float32, config=dict(BN=4, NBK=1))
        assert torch.allclose(y6, y1, rtol=1e-6, atol=1e-6 * float(y1.abs().max()))
        # persistent (M = 1): 12 row tiles x 3 K tiles over 5 programs (3 or 2 row tiles each), or 1
        for programs in (5, 1, 12):
            y = gemm.gemv_a4(xp[:1], xs[:1], wp, ws, bias=b, out_dtype=torch.float32,
                             config=dict(BN=4, NBK=2, PPS=1), persistent=True, programs=programs)
            assert torch.equal(y, y1), programs  # the same block sums in the same order
        return
    if name == "gemv":
        xq = aq.quantize_activation(x[:3], r, aq.MODE_DEQUANT, nb=2).float()
        b = torch.randn(N)
        for m in (1, 3):
            y0 = ref.brq_linear_reference(x[:m].float(), wp, ws, r, None, True).double()
            for cfg in (dict(BN=4, NBK=2), dict(BN=16, NBK=4)):
                y = gemm.gemv(xq[:m], wp, ws, bias=b, config=cfg).double()
                assert ((y - b.double() - y0).norm() / y0.norm()) < 1e-5, (m, cfg)
        return
    cfgs = [dict(BM=16, BN=16, BK=64, SWAP=sw, GROUP_M=2) for sw in (False, True)]
    if name == "gemm_fp8":
        yx = ref.brq_linear_fp8_reference(x.float(), wp, ws, r).double()
        f, e = aq.quantize_activation(x, r, aq.MODE_FP8, nb=2)
        for cfg in cfgs:
            y = gemm.w4a4_fp8(f, e, wp, ws, out_dtype=torch.float32, config=cfg).double()
            assert ((y - yx).norm() / yx.norm()) < 1e-5, cfg
            yb = gemm.w4a4_fp8(f, e, wp, ws, config=cfg).double()
            # one bf16 ulp: the interpreter casts float32 -> bf16 by truncation (the GPU rounds to nearest)
            assert torch.all((yb - yx).abs() <= 2.0 ** -7 * yx.abs() + 1e-5 * yx.abs().max()), cfg
        return
    if name == "gemm_w4a16":
        xq = aq.quantize_activation(x, r, aq.MODE_DEQUANT, nb=2).float()
        y0 = ref.brq_linear_reference(x.float(), wp, ws, r, None, True).double()
        b = torch.randn(N)
        for cfg in cfgs:
            y = gemm.w4a16(xq, wp, ws, bias=b, config=cfg).double()
            assert ((y - b.double() - y0).norm() / y0.norm()) < 1e-5, cfg
        return
    raise SystemExit(f"unknown check {name}")


if __name__ == "__main__":
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed")
        sys.exit(77)
    _run(sys.argv[1], int(sys.argv[2]))
