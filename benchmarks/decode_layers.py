"""The decode step's linears as vLLM runs them, without vLLM (GPU).

    python benchmarks/decode_layers.py [--layers 32] [--out DIR]

32 Llama-3-8B layers with distinct random weights: per layer act-quant + linear for qkv, o,
gate_up and down (down with the 32-block Hadamard R4 as brq-convert writes it), M = 1, all
4 x 32 pairs captured in one CUDA graph, so the weights stream from HBM and each kernel
starts cold, as in a decode step. Timed for the dispatch path (gemv_a4, autotuned, launched
as a programmatic dependent, persistent for wide N) and with each of those switched off
(BRQ_PDL=0, BRQ_GEMV_PERSIST=0) or forced (BRQ_GEMV_PERSIST=1), for gemv_a4 with each of its
configs pinned for every shape, and for cuBLAS bf16 on the same shapes; each dispatch variant's outputs, replayed from
a graph (where PDL kernels overlap), must equal the default path's bit for bit. It shows how far the
isolated kernel numbers (bench_kernels.py, one shape's calls back to back) carry into a step.
Per shape (`per_shape_us_per_layer`: 32 calls of one shape in a graph, weights cold): the dispatch
pair, the act-quant alone, gemv_a4 alone (activation quantized before the graph: autotuned,
persistent, and each config pinned), so a step's time splits into its parts and
each config is judged where it runs rather than by the autotuner's isolated timing.
Writes decode-layers-<gpu>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, env_set, graph_time, outlier_x, write_results  # noqa: E402

from vllm_brq import mxfp4  # noqa: E402
from vllm_brq.kernels import act_quant as aq  # noqa: E402
from vllm_brq.kernels import dispatch, gemm  # noqa: E402
from vllm_brq.rotation import hadamard  # noqa: E402


def graph_outputs(fn):
    """fn's outputs when replayed from a CUDA graph (kernel overlap as in vLLM's decode)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    return [o.clone() for o in out]


# gemv_a4 configs pinned for comparison: the autotuned two (gemm._GEMV_A4_CONFIGS) and the six that
# lost to them here (the autotuner's list until round 8)
CANDIDATES = ((4, 32, 4), (2, 32, 2), (8, 32, 4), (4, 64, 4), (2, 64, 4), (4, 64, 8), (8, 16, 4), (16, 32, 8))


def pinned_configs() -> dict[str, dict]:
    return {f"BN={bn} NBK={nbk} warps={w}": dict(BN=bn, NBK=nbk, num_warps=w, num_stages=1)
            for bn, nbk, w in CANDIDATES}


def shape_parts(layers, name: str) -> dict[str, float]:
    """us per call of one shape's decode pieces, each timed as a graph over the layers."""
    ops = [layer[name] for layer in layers]
    pre = [aq.quantize_activation(x, r, aq.MODE_PAIRS) for _, _, r, x in ops]

    def timed(fn):
        return round(graph_time([lambda: [fn(op, p) for op, p in zip(ops, pre)]], reps=20) * 1e3 / len(ops), 2)

    def linear(op, p):
        return dispatch.brq_linear(op[3], op[0], op[1], op[2].r if op[2] else None, None, True,
                                   rotation_sign=op[2].sign if op[2] else None)

    parts = {"dispatch (act-quant + gemv_a4)": timed(linear)}
    with env_set("BRQ_PDL", "1"):
        parts["dispatch, BRQ_PDL=1"] = timed(linear)
    parts.update({
             "act-quant alone": timed(lambda op, p: aq.quantize_activation(op[3], op[2], aq.MODE_PAIRS)),
             "gemv_a4 alone, autotuned": timed(lambda op, p: gemm.gemv_a4(p[0], p[1], op[0], op[1])),
             "gemv_a4 alone, two-tile loop": timed(lambda op, p: gemm.gemv_a4(p[0], p[1], op[0], op[1],
                                                                             oneshot=False)),
             "gemv_a4 alone, persistent": timed(lambda op, p: gemm.gemv_a4(p[0], p[1], op[0], op[1],
                                                                          persistent=True))})
    for label, cfg in pinned_configs().items():
        parts[f"gemv_a4 alone, {label}"] = timed(
            lambda op, p, cfg=cfg: gemm.gemv_a4(p[0], p[1], op[0], op[1], config=cfg))
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layer = {}
        for name, (N, K) in SHAPES.items():
            wp, ws = mxfp4.quantize(torch.randn(N, K, device="cuda", generator=gen) * 0.02)
            r = aq.Rotation.prepare(hadamard(32).float().cuda()) if name == "down" else None  # brq-convert's R4
            layer[name] = (wp, ws, r, outlier_x(1, K, gen))
        layers.append(layer)

    def step(config=None):
        def run():
            out = []
            for layer in layers:
                for wp, ws, r, x in layer.values():
                    if config is None:
                        out.append(dispatch.brq_linear(x, wp, ws, r.r if r else None, None, True,
                                                       rotation_sign=r.sign if r else None))
                    else:
                        xp, xs = aq.quantize_activation(x, r, aq.MODE_PAIRS)
                        out.append(gemm.gemv_a4(xp, xs, wp, ws, config=config))
            return out
        return run

    n_lin = 4 * args.layers
    want = step()()  # eager, default switches
    res, identical = {}, {}
    variants = {"dispatch (act-quant + gemv_a4, autotuned; PDL both, one-shot for N >= 16384)": {},
                "BRQ_PDL=0 BRQ_GEMV_PERSIST=0 (round 5)": {"BRQ_PDL": "0", "BRQ_GEMV_PERSIST": "0"},
                "BRQ_PDL=0": {"BRQ_PDL": "0"},
                "BRQ_PDL=1 (only the gemv a dependent; rounds 6-7)": {"BRQ_PDL": "1"},
                "BRQ_GEMV_ONESHOT=0 (gate_up persistent again; through round 11)": {"BRQ_GEMV_ONESHOT": "0"},
                "BRQ_GEMV_ONESHOT=1 (one-shot on qkv, o and gate_up)": {"BRQ_GEMV_ONESHOT": "1"},
                "BRQ_GEMV_PERSIST=0": {"BRQ_GEMV_PERSIST": "0"},
                "BRQ_GEMV_PERSIST=1 (persistent on every shape)": {"BRQ_GEMV_PERSIST": "1"}}
    for label, env in variants.items():
        with contextlib.ExitStack() as stack:
            for name, value in env.items():
                stack.enter_context(env_set(name, value))
            res[label] = graph_time([step()], reps=20) * 1e3 / args.layers
            got = graph_outputs(step())  # the same step replayed from a CUDA graph
        identical[label] = all(torch.equal(a, b) for a, b in zip(got, want))
    picks = {str(k): str(v) for k, v in gemm._gemv_a4_kernel.cache.items()}
    for label, cfg in pinned_configs().items():
        res[f"pinned {label}"] = graph_time([step(cfg)], reps=20) * 1e3 / args.layers
    per_shape = {name: shape_parts(layers, name) for name in SHAPES}
    del layers
    torch.cuda.empty_cache()
    wb = [{n: torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
           for n, (N, K) in SHAPES.items()} for _ in range(args.layers)]
    xb = {n: outlier_x(1, K, gen) for n, (N, K) in SHAPES.items()}
    res["cublas bf16"] = graph_time([lambda: [torch.matmul(xb[n], w.t()) for lw in wb for n, w in lw.items()]],
                                    reps=20) * 1e3 / args.layers
    bf16 = res["cublas bf16"]
    out = {"layers": args.layers, "linears_per_graph": n_lin,
           "us_per_layer": {k: round(v, 2) for k, v in res.items()},
           "ratio_vs_bf16": {k: round(bf16 / v, 3) for k, v in res.items()}, "autotuner_picks": picks,
           "per_shape_us_per_layer": per_shape,
           "outputs_identical_to_default_eager": identical}
    print(json.dumps(out, indent=1))
    write_results(args.out, "decode-layers", out)


if __name__ == "__main__":
    main()
