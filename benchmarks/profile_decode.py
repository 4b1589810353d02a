"""Where a batch-1 decode step spends its GPU time: brq GEMMs, activation quantization,
attention, other GEMMs (lm_head, bf16/FP8 linears) and the rest.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so torch.profiler sees
its kernels; eagerly by default, or with `--graphs` as vLLM serves (torch.compile + CUDA
graphs; CUPTI still reports each kernel of a replayed graph). One request of 512 random
prompt tokens is generated twice: 1 output token (prefill only), then 1 + STEPS tokens; the
difference divided by STEPS is one decode step's kernel time, summed per category. The same
difference of wall-clock times, without the profiler (median of 3), is the step as a user
waits for it: `step_wall_us` - `step_kernel_us` is what the GPU spends between kernels (launch
gaps, host work), which CUDA graphs are meant to remove.

    python benchmarks/profile_decode.py MODEL_DIR --out profile.json [--quantization brq] [--graphs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict

STEPS = 32
PROMPT_LEN = 512
# category -> substrings of kernel names (lower case); first match wins, in this order
CATEGORIES = {
    "brq GEMM": ("_gemv_a4", "_gemv_kernel", "_w4a16_kernel", "_w4a4_fp8_kernel", "_w4a4_dot_scaled"),
    # since round 10 the RMSNorms and SiLU-muls before brq linears run inside these kernels
    "activation quantization (with the fused RMSNorm / SiLU-mul)": ("_act_quant", "_fp8_chunk_max", "_fp8_apply",
                                                                   "_norm_pairs", "_norm_fp8"),
    "attention": ("flash", "attn", "attention", "reshape_and_cache", "paged"),
    "other GEMM (lm_head, bf16/FP8 linears)": ("gemm", "gemv", "nvjet", "cutlass", "xmma", "matmul", "splitk"),
}


def category(kernel: str) -> str:
    name = kernel.lower()
    for cat, keys in CATEGORIES.items():
        if any(k in name for k in keys):
            return cat
    return "other"


def generate(llm, prompt: list[int], max_tokens: int) -> None:
    """One greedy request of `prompt`, `max_tokens` tokens long, finished on the GPU."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    torch.cuda.synchronize()


def kernel_us(llm, prompt: list[int], max_tokens: int) -> dict[str, float]:
    """Microseconds of GPU kernel time per kernel name for one generate call."""
    import torch
    from torch.autograd import DeviceType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate(llm, prompt, max_tokens)
    out: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.device_type == DeviceType.CUDA:
            out[e.key] += e.self_device_time_total
    return out


def wall_s(llm, prompt: list[int], max_tokens: int, reps: int = 3) -> float:
    """Median wall-clock seconds of one generate call (GPU synchronized), no profiler."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        generate(llm, prompt, max_tokens)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--out", required=True)
    p.add_argument("--quantization", default=None)
    p.add_argument("--graphs", action="store_true", help="CUDA graphs + torch.compile, as vLLM serves")
    args = p.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM

    llm = LLM(model=args.model, quantization=args.quantization, enforce_eager=not args.graphs, max_model_len=2048,
              gpu_memory_utilization=0.85, seed=0)
    prompt = torch.randint(1000, 30000, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    kernel_us(llm, prompt, 4)  # warm up (Triton compiles, autotuning)
    prefill = kernel_us(llm, prompt, 1)
    full = kernel_us(llm, prompt, 1 + STEPS)
    per_kernel = {k: (full[k] - prefill.get(k, 0.0)) / STEPS for k in full}
    step_wall_us = (wall_s(llm, prompt, 1 + STEPS) - wall_s(llm, prompt, 1)) / STEPS * 1e6
    cats: dict[str, float] = defaultdict(float)
    for k, us in per_kernel.items():
        cats[category(k)] += us
    total = sum(cats.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    result = {"model": args.model, "quantization": args.quantization, "prompt_tokens": PROMPT_LEN, "steps": STEPS,
              "cuda_graphs": args.graphs, "step_kernel_us": round(total, 1), "step_wall_us": round(step_wall_us, 1),
              "categories": {c: {"us": round(us, 1), "share": round(us / total, 3)} for c, us in
                             sorted(cats.items(), key=lambda kv: -kv[1])},
              "top_kernels_us": {k[:120]: round(us, 1) for k, us in top}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
