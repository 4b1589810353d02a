"""Hardware counters of the decode GEMV (gemv_a4, M = 1) under Nsight Compute (GPU).

    ncu --clock-control none --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        -k regex:_gemv_a4 --csv python3 benchmarks/ncu_gemv_a4.py > DIR/ncu-gemv-a4.csv

One launch per Llama-3-8B shape and pinned config (no autotuning, so every profiled launch is
one of ours; ncu flushes the caches before each), and of the persistent variant
(BRQ_GEMV_PERSIST's kernel, 8 programs per SM). It answers what the timings cannot: whether
the kernel is bound by DRAM, by issue slots (instructions per weight byte) or by latency
(stall reasons, eligible warps per scheduler) - issue 4's "show the measurement that proves
why" for the M = 1 target.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, outlier_x  # noqa: E402

from vllm_brq import mxfp4  # noqa: E402
from vllm_brq.kernels import act_quant as aq  # noqa: E402
from vllm_brq.kernels import gemm  # noqa: E402

CONFIGS = ((4, 32, 4), (2, 32, 2), (8, 32, 4))  # (BN, NBK, warps): decode_layers' best three


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (N, K) in SHAPES.items():
        wp, ws = mxfp4.quantize(torch.randn(N, K, device="cuda", generator=gen) * 0.02)
        xp, xs = aq.quantize_activation(outlier_x(1, K, gen), None, aq.MODE_PAIRS)
        for bn, nbk, warps in CONFIGS:
            gemm.gemv_a4(xp, xs, wp, ws, config=dict(BN=bn, NBK=nbk, num_warps=warps, num_stages=1))
            print(f"{name} N={N} K={K} BN={bn} NBK={nbk} warps={warps}: {(wp.numel() + ws.numel()) / 1e6:.1f} MB",
                  file=sys.stderr, flush=True)
        gemm.gemv_a4(xp, xs, wp, ws, config=dict(BN=4, NBK=32, PPS=8, num_warps=4, num_stages=1), persistent=True)
        print(f"{name} persistent BN=4 NBK=32 warps=4, 8 programs per SM", file=sys.stderr, flush=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
