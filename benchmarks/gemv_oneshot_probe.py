"""Round 17 (benchmarks/NOTES-kernels.md): gemv_a4 at M = 1 with every K tile in flight on down_proj (GPU).

    python benchmarks/gemv_oneshot_probe.py      # writes gemv-oneshot-down-probe-<gpu>.json in $OUT or .

Needs this commit's gemm.ONESHOT_MAX_TILES = 8 (down's 7 tiles of 64 blocks run one-shot); reverted
after the run. Per shape (down, qkv, o), 32 layers' weights in one CUDA graph: gemv_a4 alone on a
pre-quantized activation and the PDL pair act-quant + gemv_a4, each config pinned, and each
config's float32 output against the exact MXFP4 product.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import graph_time, outlier_x, write_results  # noqa: E402

from vllm_brq import mxfp4  # noqa: E402
from vllm_brq.kernels import act_quant as aq  # noqa: E402
from vllm_brq.kernels import gemm  # noqa: E402
from vllm_brq.kernels import reference as ref  # noqa: E402
from vllm_brq.rotation import hadamard  # noqa: E402


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    L = 32
    res = {}
    for shape, (N, K) in {"down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096)}.items():
        r = aq.Rotation.prepare(hadamard(32).float().cuda()) if shape == "down" else None
        ws_ = [mxfp4.quantize(torch.randn(N, K, device="cuda", generator=gen) * 0.02) for _ in range(L)]
        xs = [outlier_x(1, K, gen) for _ in range(L)]
        pre = [aq.quantize_activation(x, r, aq.MODE_PAIRS) for x in xs]
        exact = ref.brq_linear_reference(xs[0].float(), *ws_[0], r.r if r else None, None, True).double()
        cfgs = {"BN=4 NBK=32 w=4 loop (autotune pick)": (dict(BN=4, NBK=32, num_warps=4, num_stages=1), False),
                "BN=2 NBK=32 w=2 loop": (dict(BN=2, NBK=32, num_warps=2, num_stages=1), False),
                "BN=4 NBK=64 w=4 loop": (dict(BN=4, NBK=64, num_warps=4, num_stages=1), False),
                "BN=4 NBK=64 w=4 oneshot": (dict(BN=4, NBK=64, num_warps=4, num_stages=1), True),
                "BN=2 NBK=64 w=2 oneshot": (dict(BN=2, NBK=64, num_warps=2, num_stages=1), True),
                "BN=2 NBK=64 w=4 oneshot": (dict(BN=2, NBK=64, num_warps=4, num_stages=1), True),
                "BN=4 NBK=32 w=4 oneshot": (dict(BN=4, NBK=32, num_warps=4, num_stages=1), True),
                "BN=2 NBK=32 w=2 oneshot": (dict(BN=2, NBK=32, num_warps=2, num_stages=1), True)}
        out = {}
        for label, (cfg, one) in cfgs.items():
            try:
                y = gemm.gemv_a4(*pre[0], *ws_[0], out_dtype=torch.float32, config=cfg, oneshot=one).double()
                err = ((y - exact).norm() / exact.norm()).item()
                alone = graph_time([lambda p=p, w=w: gemm.gemv_a4(*p, *w, config=cfg, oneshot=one) for p, w in zip(pre, ws_)], reps=20)

                def pair(x, w):
                    xp, xsc = aq.quantize_activation(x * 1, r, aq.MODE_PAIRS, launch_dependents=True, pdl=True)
                    return gemm.gemv_a4(xp, xsc, *w, config=cfg, oneshot=one, pdl=True)
                pr = graph_time([lambda x=x, w=w: pair(x, w) for x, w in zip(xs, ws_)], reps=20)
                out[label] = {"gemv_alone_us": round(alone * 1e3, 2), "pdl_pair_us": round(pr * 1e3, 2), "rel_err_fp32": err}
            except Exception as exc:
                out[label] = {"error": repr(exc)[:300]}
            print(shape, label, out[label], flush=True)
        res[shape] = out
        del ws_, xs, pre
        torch.cuda.empty_cache()
    write_results(os.environ.get("OUT", "."), "gemv-oneshot-down-probe", {"layers": L, "per_shape": res})


if __name__ == "__main__":
    main()
