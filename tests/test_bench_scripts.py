"""The GPU bench scripts' CPU-side logic: kernel-name categories of the decode profile, the
README tables rendered from committed results (so a results file and its table agree)."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import accuracy_table  # noqa: E402
import bench_e2e  # noqa: E402
import bench_norm_quant  # noqa: E402
import profile_decode  # noqa: E402
import report  # noqa: E402

SCRIPTS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_imports_without_a_gpu(name):
    """Every GPU script at least imports here (names, signatures of what it calls at import)."""
    assert importlib.import_module(name).__doc__


def test_kernel_tables_in_readme_are_the_results_file():
    readme = (REPO / "README.md").read_text()
    assert report.kernels_table(REPO / "benchmarks/results/kernels-h100.json") in readme
    assert report.prefill_bounds_table(REPO / "benchmarks/results/kernels-h100.json") in readme
    # issue 4's target tables, inside a list item (indented two spaces)
    for table in (report.prefill_targets_table(REPO / "benchmarks/results/kernels-h100.json"),
                  report.decode_targets_table(REPO / "benchmarks/results/stream-floor-probe-h100.json")):
        assert "\n".join("  " + line for line in table.split("\n")) in readme


def test_decode_profile_categories():
    c = profile_decode.category
    assert c("_gemv_a4_kernel") == "brq GEMM"
    assert c("_gemv_a4_persist_kernel") == "brq GEMM"
    act = "activation quantization (with the fused RMSNorm / SiLU-mul)"
    assert c("_act_quant_kernel") == act
    assert c("_norm_pairs_kernel") == act and c("_norm_fp8_row_kernel") == act  # round 10's fused producers
    assert c("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<") == "attention"
    assert c("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16>") == "attention"
    assert c("nvjet_sm90_tst_384x8_64x4_2x1_v_bz_TNT") == "other GEMM (lm_head, bf16/FP8 linears)"
    assert c("void vllm::fused_add_rms_norm_kernel<c10::BFloat16>") == "other"


def test_e2e_table_matches_results():
    result = json.loads((REPO / "benchmarks/results/e2e-h100.json").read_text())
    table = bench_e2e.markdown(result)
    rows = {r["mode"]: r for r in result["rows"]}
    assert table.count("\n") == len(rows) + 1
    bf16 = rows["bf16"]
    for mode, r in rows.items():
        line = next(x for x in table.splitlines() if x.startswith(f"| {mode} |"))
        assert f"{bf16['latency_s'] / r['latency_s']:.2f}x" in line
    profile = result["decode_profile"]["brq-w4a4"]
    assert abs(sum(v["share"] for v in profile["categories"].values()) - 1) < 0.01


def test_norm_quant_table_in_readme_is_the_results_file():
    result = json.loads((REPO / "benchmarks/results/norm-quant-h100.json").read_text())
    assert bench_norm_quant.markdown(result) in (REPO / "README.md").read_text()
    assert all(r["fused_vs_reference_rel"] < 1e-4 for r in result["rows"])


def test_accuracy_table_in_readme_is_the_results_file():
    result = json.loads((REPO / "benchmarks/results/accuracy-smollm2.json").read_text())
    md = accuracy_table.markdown(result["table"], result["settings"], result["device"], result["dtype"])
    readme = (REPO / "README.md").read_text()
    assert md in readme
    assert result["settings"]["windows"] >= 32 and result["settings"]["seqlen"] >= 2048
    seeds = {r["key"]: r["seeds"] for r in result["table"]}
    assert seeds["brq"] == seeds["brq-rtn"] == [0, 1, 2]


STREAM_READ_CHECK = """
import functools, operator, sys, torch
sys.path.insert(0, sys.argv[1])
import stream_floor_probe as p
from vllm_brq import mxfp4
g = torch.Generator().manual_seed(int(sys.argv[2]))
wp, ws = mxfp4.quantize(torch.randn(12, 256, generator=g))
buf = torch.cat([wp.view(-1), ws.view(-1)])
want = functools.reduce(operator.xor, buf.view(torch.int32).tolist())
for cfg in ((4, 4, 1, None), (4, 2, 4, 3), (8, 4, 1, 2)):  # one program per chunk, grid-stride loops
    out = torch.zeros(64, dtype=torch.int32)
    p.flat_read(buf, out, *cfg)
    assert functools.reduce(operator.xor, out.tolist()) == want, cfg
out = torch.zeros(64, dtype=torch.int32)
p.rows_read(wp, ws, out, 4, 4, 4)
w32 = wp.view(torch.int32)
assert out[:12].tolist() == [functools.reduce(operator.xor, w32[i].tolist()) + int(ws[i].int().sum()) for i in range(12)]
"""


def test_stream_floor_probe_kernels_read_every_byte():
    """The probe's read kernels (timed on the GPU) touch each byte once, under the interpreter."""
    pytest.importorskip("triton")
    import os
    import subprocess

    seed = int.from_bytes(os.urandom(4), "little")
    res = subprocess.run([sys.executable, "-c", STREAM_READ_CHECK, str(REPO / "benchmarks"), str(seed)],
                         env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"seed {seed}\n{res.stderr[-3000:]}"


def test_stream_floor_fit():
    import stream_floor_probe

    f = stream_floor_probe.fit([(b, 2.0 + b / 2.5e6) for b in (8e6, 13e6, 31e6, 62e6)])
    assert f["fixed_us"] == 2.0 and f["stream_TB_s"] == 2.5
