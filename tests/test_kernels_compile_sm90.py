"""Every Triton kernel compiles for Hopper (sm90) on this CPU machine, for each autotune config.

The interpreter runs the kernels' Python, not Triton's compiler, so it misses what only the
compiler rejects (a constexpr `if` with an early return once built both dots of a SWAP
config: the H100 refused it). Triton compiles to PTX and a cubin without a GPU (its wheel
ships ptxas); nothing is launched. Pointer and stride arguments get the divisibility by 16
that the launcher specializes on aligned tensors, as on the GPU.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from conftest import REPO  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from sass_counts import ACT, WEIGHTS as W, compile_sm90 as _compile, jit_of as _jit, sass  # noqa: E402

from vllm_brq.kernels import act_quant as aq  # noqa: E402
from vllm_brq.kernels import fp8_head  # noqa: E402
from vllm_brq.kernels import gemm  # noqa: E402
from vllm_brq.kernels import norm_quant as nq  # noqa: E402


def _each_config(kernel, ptrs, variants):
    _, configs = _jit(kernel)
    for variant in variants:
        for c in configs or [None]:
            cx = dict(variant, **(c.kwargs if c else {}))
            ck = _compile(kernel, ptrs, cx, c.num_warps if c else cx.pop("num_warps", 4), c.num_stages if c else 1)
            assert ck.asm["cubin"], (kernel, cx)


GEMM_CASES = {
    "w4a4_fp8": (gemm._w4a4_fp8_kernel, dict(W, a_ptr="*fp8e4nv", ea_ptr="*i32"), [dict(HAS_BIAS=True)]),
    "w4a16": (gemm._w4a16_kernel, dict(W, a_ptr="*bf16"), [dict(HAS_BIAS=False)]),
    "w4a16_decode": (gemm._decode_kernel, dict(W, a_ptr="*bf16"), [dict(HAS_BIAS=True)]),
    "gemv": (gemm._gemv_kernel, dict(W, a_ptr="*bf16"), [dict(HAS_BIAS=False, BM=1, USE_ASM=True),
                                                          dict(HAS_BIAS=True, BM=4, USE_ASM=False)]),
    "gemv_a4": (gemm._gemv_a4_kernel, dict(W, a_ptr="*i32", as_ptr="*u8", w_ptr="*i32"),
                [dict(HAS_BIAS=False, BM=1, USE_ASM=True, EVEN_K=True, PDL=True, ALLOW_ONESHOT=True, ONESHOT=4),
                 dict(HAS_BIAS=False, BM=1, USE_ASM=True, EVEN_K=False, PDL=False, ALLOW_ONESHOT=True, ONESHOT=3),
                 dict(HAS_BIAS=True, BM=4, USE_ASM=True, EVEN_K=False, PDL=False, ALLOW_ONESHOT=True, ONESHOT=0)]),
    "gemv_a4_persist": (gemm._gemv_a4_persist_kernel, dict(W, a_ptr="*i32", as_ptr="*u8", w_ptr="*i32"),
                        [dict(HAS_BIAS=True, USE_ASM=True, PDL=True), dict(HAS_BIAS=False, USE_ASM=False, PDL=False)]),
    "dequantize": (gemm._dequant_kernel, {"w_ptr": "*u8", "ws_ptr": "*u8", "out_ptr": "*bf16"}, [dict(BN=32, BK=256)]),
}

ACT_CASES = {
    "act_quant_2d": (aq._act_quant_kernel, dict(ACT, q_ptr="*u8", s_ptr="*u8"),
                     [dict(R_BSTRIDE=0, HAS_R=True, MODE=m, BM=1, NB=16, ROT_PRECISION="tf32x3", SIGN=sign,
                           LAUNCH_DEPENDENTS=sign) for m in (aq.MODE_MXFP4, aq.MODE_PAIRS) for sign in (False, True)]
                     + [dict(R_BSTRIDE=1024, HAS_R=True, MODE=aq.MODE_MXFP4, BM=16, NB=4, ROT_PRECISION="tf32x3",
                             SIGN=True, LAUNCH_DEPENDENTS=False)]),
    "act_quant_fp8_row": (aq._act_quant_fp8_row_kernel,
                          dict(ACT, q_ptr="*fp8e4nv", e_ptr="*i32", sc_ptr="*fp32"),
                          [dict(HAS_R=r, SIGN=r, BM=bm, NBP=nbp, ROT_PRECISION="tf32x3", ROUND=rnd, HAD=had,
                                PLAIN=plain, num_warps=w)
                           for (bm, nbp, w) in ((1, 512, 8), (2, 128, 4))
                           for r, had, plain in ((False, False, False), (True, False, False), (True, True, False),
                                                 (True, True, True))
                           for rnd in ("fast", "bits")]),
}
ACT_CASES["act_quant_silu"] = (  # down_proj's input: SiLU-mul in the loads, with the FWHT (row) or the dot (2D)
    aq._act_quant_fp8_row_kernel, dict(ACT, q_ptr="*fp8e4nv", e_ptr="*i32", sc_ptr="*fp32"),
    [dict(HAS_R=True, SIGN=True, BM=1, NBP=512, ROT_PRECISION="tf32x3", ROUND="bits", HAD=True, PLAIN=True,
          SILU=True, num_warps=w) for w in (8, 16)])
ACT_CASES["act_quant_2d_silu"] = (aq._act_quant_kernel, dict(ACT, q_ptr="*fp16", s_ptr="*u8"),
                                  [dict(R_BSTRIDE=0, HAS_R=True, MODE=aq.MODE_PAIRS, BM=1, NB=16,
                                        ROT_PRECISION="tf32x3", SIGN=True, LAUNCH_DEPENDENTS=True, SILU=True)])
MMA_PTRS = {"r_ptr": "*fp32", "q_ptr": "*fp8e4nv", "e_ptr": "*i32", "sc_ptr": "*fp32"}
ACT_CASES["act_quant_fp8_mma"] = (  # the plain R4 on tensor cores (round 14), bf16 and fp16, SiLU-mul too
    aq._act_quant_fp8_mma_kernel, dict(MMA_PTRS, x_ptr="*bf16"),
    [dict(NU=nu, ROUND=rnd, MMA=True, SILU=silu, num_warps=w) for nu, w in ((2048, 8), (2048, 16), (512, 4))
     for rnd in ("fast", "bits") for silu in (False, True)])
ACT_CASES["act_quant_fp8_mma_f16"] = (aq._act_quant_fp8_mma_kernel, dict(MMA_PTRS, x_ptr="*fp16"),
                                      [dict(NU=2048, ROUND="bits", MMA=True, num_warps=8)])
NORM = {"x_ptr": "*bf16", "r_ptr": "*bf16", "o_ptr": "*bf16", "w_ptr": "*bf16", "rot_ptr": "*fp32", "rs_ptr": "*bf16",
        "eps": "fp32"}
ACT_CASES.update({  # R1 online: the row kernel's FWHT (plain or signed Hadamard), the pairs kernel's +-1 dot
    "norm_fp8_row": (nq._norm_fp8_row_kernel, dict(NORM, q_ptr="*fp8e4nv", e_ptr="*i32", sc_ptr="*fp32"),
                     [dict(HAS_RES=res, BM=bm, NBP=nbp, ROUND="bits", num_warps=w)
                      for (bm, nbp, w) in ((1, 512, 8), (2, 128, 4)) for res in (False, True)]
                     + [dict(HAS_RES=True, BM=2, NBP=128, ROUND="bits", HAS_R=True, SIGN=True, HAD=True, PLAIN=plain,
                             num_warps=4) for plain in (False, True)]),
    "norm_fp8_mma": (nq._norm_fp8_mma_kernel, dict(NORM, q_ptr="*fp8e4nv", e_ptr="*i32", sc_ptr="*fp32"),
                     [dict(HAS_RES=True, NU=512, ROUND="bits", MMA=True, num_warps=4),
                      dict(HAS_RES=False, NU=2048, ROUND="fast", MMA=True, num_warps=8)]),
    "norm_pairs": (nq._norm_pairs_kernel, dict(NORM, q_ptr="*fp16", s_ptr="*u8"),
                   [dict(HAS_RES=res, BM=1, NB=16, SUM_NB=128, LAUNCH_DEPENDENTS=res, WAIT_PRIMARY=res, num_warps=w)
                    for res in (False, True) for w in (4, 8)] + [dict(HAS_RES=True, BM=16, NB=4, SUM_NB=128, LAUNCH_DEPENDENTS=False)]
                   + [dict(HAS_RES=True, BM=1, NB=16, SUM_NB=128, LAUNCH_DEPENDENTS=True, WAIT_PRIMARY=True, HAS_R=True,
                           SIGN=True, ROT_PRECISION="tf32x3", num_warps=8)]),
})


FP8_SPLIT = (fp8_head._fp8_split_kernel, {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32"},
             dict(MAX=448.0, MIN_EXP=fp8_head.FP8_SPLIT_MIN_EXP, CHUNK=fp8_head.CHUNK))
ACT_CASES["fp8_head_split"] = (*FP8_SPLIT[:2], [FP8_SPLIT[2]])


def test_fp8_head_rounding_survives_the_compiler():
    """The e4m3 rounding below 2^-6 adds and removes 1.5 * 2^14: the compiler must keep both (a
    fast-math fold would leave the value unrounded); no division is left (powers of two multiply)."""
    ptx = _compile(*FP8_SPLIT).asm["ptx"]
    assert "0f46C00000" in ptx  # 24576.0
    assert "div." not in ptx


@pytest.mark.parametrize("name", sorted(GEMM_CASES) + sorted(ACT_CASES))
def test_kernel_compiles_for_sm90(name):
    kernel, ptrs, variants = {**GEMM_CASES, **ACT_CASES}[name]
    _each_config(kernel, ptrs, variants)


@pytest.mark.parametrize("persistent,tiles", [(False, 0), (False, 4), (True, 0)])
def test_gemv_a4_pdl_requests_the_first_weight_tiles_before_the_wait(persistent, tiles):
    """With PDL the gemv may run while the act-quant that writes its input ends: only weights
    and their scales (two tiles, one-shot too: a 16-byte word + a scale byte each) may be loaded
    before griddepcontrol.wait; without PDL there is no wait at all."""
    ptrs = dict(W, a_ptr="*i32", as_ptr="*u8", w_ptr="*i32")
    kernel = gemm._gemv_a4_persist_kernel if persistent else gemm._gemv_a4_kernel
    cx = dict(HAS_BIAS=True, BM=1, USE_ASM=True, EVEN_K=True, BN=4, NBK=32, PPS=8, ALLOW_ONESHOT=tiles > 0,
              ONESHOT=tiles)
    lines = _compile(kernel, ptrs, dict(cx, PDL=True)).asm["ptx"].splitlines()
    waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    assert len(waits) == 1
    early = [line.split()[0] for line in lines[:waits[0]] if "ld.global" in line]
    assert sorted(early) == ["ld.global.nc.u8", "ld.global.nc.u8", "ld.global.v4.b32", "ld.global.v4.b32"], early
    assert "griddepcontrol" not in _compile(kernel, ptrs, dict(cx, PDL=False)).asm["ptx"]


def test_act_quant_as_a_dependent_waits_before_reading_its_input():
    """BRQ_PDL=2: the act-quant may start while the kernel writing x ends, so griddepcontrol.wait
    comes before any load (after the trigger for the GEMV behind it)."""
    ptrs = dict(ACT, q_ptr="*fp16", s_ptr="*u8")
    cx = dict(R_BSTRIDE=0, HAS_R=True, MODE=aq.MODE_PAIRS, BM=1, NB=16, ROT_PRECISION="tf32x3", SIGN=True,
              LAUNCH_DEPENDENTS=True)
    ptx = _compile(aq._act_quant_kernel, ptrs, dict(cx, WAIT_PRIMARY=True)).asm["ptx"]
    assert ptx.index("griddepcontrol.launch_dependents") < ptx.index("griddepcontrol.wait") < ptx.index("ld.global")
    assert "griddepcontrol.wait" not in _compile(aq._act_quant_kernel, ptrs, cx).asm["ptx"]


def test_act_quant_triggers_dependents_first_only_when_asked():
    ptrs = dict(ACT, q_ptr="*fp16", s_ptr="*u8")
    cx = dict(R_BSTRIDE=0, HAS_R=False, MODE=aq.MODE_PAIRS, BM=1, NB=16, ROT_PRECISION="tf32x3", SIGN=False)
    ptx = _compile(aq._act_quant_kernel, ptrs, dict(cx, LAUNCH_DEPENDENTS=True)).asm["ptx"]
    assert ptx.index("griddepcontrol.launch_dependents") < ptx.index("ld.global")
    assert "griddepcontrol" not in _compile(aq._act_quant_kernel, ptrs, dict(cx, LAUNCH_DEPENDENTS=False)).asm["ptx"]


def test_probe_kernels_compile_to_what_they_measure():
    """The round-9 GPU probes stay runnable: l2_prefetch_probe's kernels are an L2 bulk prefetch
    and per-line prefetches; gemv_issue_probe's block dots swap the nibble decode (e4m3: F2FP
    conversions; floor: fewer instructions per loop than the shipped decode). Each decode in
    its own process, as the probe runs them: Triton keys a JIT function's cache on the module
    constant's value when the function is first compiled in a process."""
    import l2_prefetch_probe

    ints = {"base": "i64", "nbytes": "i64", "lo": "i64", "hi": "i64"}
    bulk = _compile(l2_prefetch_probe._prefetch_kernel, ints, {"PIECE": 65536}, 1).asm["ptx"]
    assert "cp.async.bulk.prefetch.L2.global" in bulk
    lines = _compile(l2_prefetch_probe._prefetch_lines_kernel, ints, {"PIECE": 65536, "LINES": 512}, 4).asm["ptx"]
    assert "prefetch.global.L2" in lines
    script = (
        "import sys; sys.path.insert(0, 'benchmarks')\n"
        "import gemv_issue_probe\n"
        "from sass_counts import WEIGHTS, compile_sm90, loop_body, sass\n"
        "from vllm_brq.kernels import gemm\n"
        "gemv_issue_probe.use_decode(sys.argv[1])\n"
        "ck = compile_sm90(gemm._gemv_a4_kernel, dict(WEIGHTS, a_ptr='*i32', as_ptr='*u8', w_ptr='*i32'),\n"
        "                  dict(HAS_BIAS=False, BM=1, BN=4, NBK=32, USE_ASM=True, EVEN_K=True, PDL=False,\n"
        "                       ALLOW_ONESHOT=False, ONESHOT=0))\n"
        "print(' '.join(loop_body(sass(ck))))\n")
    loops = {v: subprocess.run([sys.executable, "-c", script, v], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split()
             for v in ("current", "e4m3", "floor")}
    assert "F2FP" in loops["e4m3"] and "F2FP" not in loops["current"]
    assert len(loops["floor"]) < len(loops["e4m3"]) < len(loops["current"])


@pytest.mark.parametrize("warps,silu,x_type", [(8, False, "*bf16"), (16, True, "*bf16"), (4, False, "*fp16")])
def test_hadamard_mma_gets_the_layout_its_fragments_assume(warps, silu, x_type):
    """`_hadamard32_mma` hands a lane's 8 loaded elements to mma.sync as its A registers, which
    is right only if Triton lays the [NU, 8] row out as 8 elements per thread and 32 consecutive
    units per warp, and feeds the inline asm in that layout (no conversion in between), with the
    registers in load order (no moves into another order before the tensor-core op)."""
    nu = 2048 if warps > 4 else 512
    ck = _compile(aq._act_quant_fp8_mma_kernel, dict(MMA_PTRS, x_ptr=x_type),
                  dict(NU=nu, ROUND="bits", MMA=True, SILU=silu), warps)
    ttgir = ck.asm["ttgir"]
    layout = f"sizePerThread = [1, 8], threadsPerWarp = [32, 1], warpsPerCTA = [{warps}, 1], order = [1, 0]"
    blocked = [ln.split(" = ", 1)[0] for ln in ttgir.splitlines() if ln.startswith("#blocked") and layout in ln]
    assert blocked, ttgir[:2000]
    asm_ops = [ln for ln in ttgir.splitlines() if "tt.elementwise_inline_asm" in ln]
    assert asm_ops and all(f"x8x{'bf16' if 'bf' in x_type else 'f16'}, {blocked[0]}>" in ln for ln in asm_ops)
    assert "convert_layout" not in ttgir and "local_alloc" not in ttgir
    ops = [ins.split()[0] for _, ins in sass(ck)]
    per_thread_units = nu // (32 * warps)
    assert sum(op.startswith("HMMA.16816.F32") for op in ops) == 2 * per_thread_units
    # the A registers are the loaded quads themselves: a reorder would cost 8 moves per unit (the
    # few left copy the B constants into register pairs)
    assert ops.count("IMAD.MOV.U32") < 4 * per_thread_units
