"""A BRQ checkpoint served by vLLM on a GPU agrees with the CPU reference (issue 6 (a)).

For a converted SmolLM2 (GPTQ W4A4) and its unquantized source, four prompts (the test
suite's prompt and three 256-token windows of Persuasion) are scored two ways:
- the CPU reference: transformers in float32 on the CPU, with vllm_brq.hf_reference
  simulating the served W4A4 math (the spec of the plugin's linear);
- vLLM on the GPU: prompt logprobs and 64 greedy tokens, in float32 (the plugin routes
  float32 to the torch reference on CUDA: the tolerance of the plugin's CPU tests applies,
  1e-3 and >= 60 of 64 greedy tokens) and in bfloat16 with torch.compile and CUDA graphs
  (the Triton kernels: compared with the noise floor of vLLM's own bf16 serving of the
  unquantized model against its float32 reference; W4A4 amplifies that noise, since a
  bf16 rounding difference can move an activation across an MXFP4 rounding boundary, so
  the perplexity ratio on the same tokens is reported too).
Then `vllm serve` answers one chat request through the openai client.

    python benchmarks/gpu_agreement.py --source SMOLLM2 --brq CKPT --text persuasion.txt --out agreement.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import vllm_harness as vh  # noqa: E402

TOL = 1e-3
MIN_GREEDY = 60


def prompts(tokenizer_dir: Path, text: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(text.read_text()[:200_000])["input_ids"]
    return [tok(vh.PROMPT)["input_ids"]] + [ids[i * 4096: i * 4096 + 256] for i in (1, 2, 3)]


def reference(model, ps: list[list[int]]) -> list[tuple[torch.Tensor, list[int]]]:
    return [vh.hf_prompt_logprobs(model, p) for p in ps]


def served(path: Path, ps: list[list[int]], dtype: str, eager: bool) -> tuple[list, float]:
    t0 = time.perf_counter()
    with vh.inprocess_llm(path, enforce_eager=eager, dtype=dtype, gpu_memory_utilization=0.3) as llm:
        out = [vh.vllm_prompt_logprobs(llm, p) for p in ps]
    return out, time.perf_counter() - t0


def compare(ref: list, got: list) -> dict:
    diffs = torch.cat([(a[0] - b[0]).abs() for a, b in zip(ref, got)])
    prefix = [vh.common_prefix(a[1], b[1]) for a, b in zip(ref, got)]
    lp_ref = torch.cat([a[0] for a in ref]).mean()
    lp_got = torch.cat([b[0] for b in got]).mean()
    return {"max_abs_logprob_diff": float(diffs.max()), "mean_abs_logprob_diff": float(diffs.mean()),
            "ppl_ratio": float(torch.exp(lp_ref - lp_got)), "greedy_common_prefix": prefix,
            "tokens": int(diffs.numel())}


def chat(path: Path) -> dict:
    """`vllm serve` on the GPU answers one chat request over HTTP (stdlib client: the
    air-gapped wheelhouse's openai package misses its truststore dependency)."""
    import urllib.request

    t0 = time.perf_counter()
    server = vh.Server(path, "--dtype", "bfloat16", "--quantization", "brq", "--gpu-memory-utilization", "0.3",
                       timeout=600)
    ready = time.perf_counter() - t0
    try:
        body = {"model": str(path), "max_tokens": 48, "temperature": 0.0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())["choices"][0]["message"]["content"]
    finally:
        rc = server.stop()
    return {"ready_s": round(ready, 1), "answer": answer, "exit_code": rc}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, help="the unquantized model folder")
    p.add_argument("--brq", type=Path, required=True, help="its BRQ checkpoint (GPTQ W4A4)")
    p.add_argument("--text", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--chat-only", action="store_true", help="only the `vllm serve` chat request (any brq checkpoint)")
    args = p.parse_args(argv)
    if args.chat_only:
        result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  "date": datetime.date.today().isoformat(), "checkpoint": args.brq.name, "chat": chat(args.brq)}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return
    if args.source is None or args.text is None:
        p.error("--source and --text are needed unless --chat-only")
    from transformers import AutoModelForCausalLM

    from vllm_brq import hf_reference

    ps = prompts(args.source, args.text)
    refs = {"brq": reference(hf_reference.load(args.brq), ps),
            "unquantized": reference(AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval(), ps)}
    paths = {"brq": args.brq, "unquantized": args.source}
    runs = {}
    for name in ("brq", "unquantized"):
        for dtype, eager in (("float32", True), ("bfloat16", False)):
            got, secs = served(paths[name], ps, dtype, eager)
            runs[f"{name} {dtype}"] = {**compare(refs[name], got), "engine_s": round(secs, 1),
                                       "enforce_eager": eager}
            print(f"{name} {dtype}: {runs[f'{name} {dtype}']}", flush=True)
    fp32 = runs["brq float32"]
    bf16, floor = runs["brq bfloat16"], runs["unquantized bfloat16"]
    import vllm

    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "date": datetime.date.today().isoformat(),
              "vllm": vllm.__version__, "torch": torch.__version__, "checkpoint": args.brq.name,
              "prompts": [len(x) for x in ps], "greedy_tokens": 64, "runs": runs,
              "float32_within_plugin_tolerance": fp32["max_abs_logprob_diff"] <= TOL
              and min(fp32["greedy_common_prefix"]) >= MIN_GREEDY,
              "bfloat16_mean_diff_vs_noise_floor": round(bf16["mean_abs_logprob_diff"] / floor["mean_abs_logprob_diff"], 2),
              "chat": chat(args.brq)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
