"""Hopper (sm90) instruction counts of the Triton kernels, compiled on this machine (no GPU).

    PYTHONPATH=/tmp/t36 python benchmarks/sass_counts.py     # the GPU host's Triton 3.6 (DEVELOPING.md)

The instruction-count numbers of benchmarks/NOTES-kernels.md (round 6) come from here: the
FP8 act-quant row kernel at K = 14336 (instructions per element; 448 blocks padded to 512),
and the decode GEMV loops (instructions per loop iteration, i.e. per 16 weight bytes of a
thread). tests/test_kernels_compile_sm90.py compiles through `compile_sm90` too.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 32)
WEIGHTS = {"w_ptr": "*u8", "ws_ptr": "*u8", "bias_ptr": "*bf16", "c_ptr": "*bf16"}
ACT = {"x_ptr": "*bf16", "r_ptr": "*fp32", "rs_ptr": "*bf16"}


def jit_of(kernel):
    """The JITFunction under autotune/heuristics wrappers, and the autotune configs (or None)."""
    configs = getattr(kernel, "configs", None)
    fn = kernel
    while type(fn).__name__ != "JITFunction":
        fn = fn.fn
    return fn, configs


def compile_sm90(kernel, ptrs: dict, constexprs: dict, num_warps=4, num_stages=1):
    """Compile for sm90 without launching. Pointers, strides, N and K get the divisibility by 16
    that the launcher specializes on aligned tensors, as on the GPU; other ints are i32."""
    fn, _ = jit_of(kernel)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
        else:
            sig[name] = ptrs.get(name, "i32")
            if name.endswith("_ptr") or name.startswith("stride") or name in ("N", "K"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    given = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    for i, name in enumerate(fn.arg_names):  # constexpr parameters left out take their defaults
        if fn.params[i].is_constexpr and name not in given and fn.params[i].default is not inspect.Parameter.empty:
            given[name] = fn.params[i].default
    src = ASTSource(fn=fn, signature=sig, constexprs=given, attrs=attrs)
    return triton.compile(src, target=SM90, options={"num_warps": num_warps, "num_stages": num_stages})


def sass(compiled) -> list[tuple[int, str]]:
    """(address, opcode) of each SASS instruction, by the cuobjdump bundled with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    out = []
    for line in text.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)([^;]*)", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2) + m.group(3)))
    return out


def loop_body(instrs) -> list[str]:
    """The opcodes of the first loop (from a backward branch's target to the branch)."""
    for addr, ins in instrs:
        m = re.match(r"BRA\s+0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            return [i.split()[0].split(".")[0] for a, i in instrs if start <= a <= addr]
    return []


def main() -> None:
    from vllm_brq.kernels import act_quant as aq
    from vllm_brq.kernels import gemm

    print(f"triton {triton.__version__}, sm90")
    nbp, bm, warps = 512, 1, 8  # K = 14336 as default_fp8_impl runs it
    per_thread = nbp * 32 * bm / (warps * 32)
    for label, rot, had, plain in (("no rotation", False, False, False), ("FWHT, signed R4", True, True, False),
                                   ("FWHT, plain R4", True, True, True)):
        for rounding in ("fast", "bits"):
            ck = compile_sm90(aq._act_quant_fp8_row_kernel, dict(ACT, q_ptr="*fp8e4nv", e_ptr="*i32", sc_ptr="*fp32"),
                              dict(HAS_R=rot, SIGN=rot, BM=bm, NBP=nbp, ROT_PRECISION="tf32x3", ROUND=rounding,
                                   HAD=had, PLAIN=plain), warps)
            n = len(sass(ck))
            print(f"act-quant FP8 row K=14336, {label}, rounding {rounding}: {n} instructions, "
                  f"{n / per_thread:.1f} per element")
    for rounding in ("fast", "bits"):  # the plain R4 on tensor cores (round 14): NU = 2048 units of 8
        ck = compile_sm90(aq._act_quant_fp8_mma_kernel, {"x_ptr": "*bf16", "r_ptr": "*fp32", "q_ptr": "*fp8e4nv",
                                                         "e_ptr": "*i32", "sc_ptr": "*fp32"},
                          dict(NU=nbp * 4, ROUND=rounding, MMA=True), warps)
        n = len(sass(ck))
        print(f"act-quant FP8 row K=14336, mma Hadamard, plain R4, rounding {rounding}: {n} instructions, "
              f"{n / per_thread:.1f} per element")
    ptrs = dict(WEIGHTS, a_ptr="*i32", as_ptr="*u8", w_ptr="*i32")
    for bn, nbk, w in ((4, 32, 4), (2, 32, 2)):
        ck = compile_sm90(gemm._gemv_a4_kernel, ptrs, dict(HAS_BIAS=False, BM=1, BN=bn, NBK=nbk, USE_ASM=True,
                                                           EVEN_K=True, PDL=False, ALLOW_ONESHOT=False,
                                                           ONESHOT=0), w)
        print(f"gemv_a4 BN={bn} NBK={nbk} warps={w}: loop {len(loop_body(sass(ck)))} instructions per iteration")
        ck = compile_sm90(gemm._gemv_a4_persist_kernel, ptrs, dict(HAS_BIAS=False, BN=bn, NBK=nbk, PPS=8, USE_ASM=True,
                                                                   PDL=False), w)
        body = loop_body(sass(ck))
        print(f"gemv_a4 persistent BN={bn} NBK={nbk} warps={w}: loop {len(body)} instructions including the "
              f"once-per-row-tile branches ({body.count('BAR')} BAR.SYNC, all in the row-tile epilogue)")


if __name__ == "__main__":
    main()
