"""brq-eval: perplexity as served, through vLLM's prompt logprobs.

The number is what serving produces: the model (a BRQ checkpoint or any unquantized model,
for the baseline) runs inside vLLM with the brq method, and the perplexity is exp of the
mean negative log-likelihood of every token after the first in non-overlapping windows.

    brq-eval out/smollm2-brq --text persuasion.txt --seqlen 2048 --windows 32 --json r.json
    brq-eval out/smollm2-brq --tasks piqa,arc_easy        # zero-shot via lm-eval (network)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("brq-eval")


def load_text(path: str | None) -> tuple[str, str]:
    """(text, source name): a .txt file, or WikiText-2's test split through `datasets`."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise SystemExit(f"brq-eval: text file {path} does not exist")
        return p.read_text(encoding="utf-8"), p.name
    try:
        import datasets
    except ImportError:
        raise SystemExit("brq-eval: without --text the default is WikiText-2, which needs `pip install datasets`") from None
    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    return "\n\n".join(ds["text"]), "wikitext2-test"


def make_windows(token_ids: list[int], seqlen: int, windows: int | None) -> list[list[int]]:
    """Non-overlapping windows of exactly ``seqlen`` tokens (the ragged tail is dropped)."""
    n = len(token_ids) // seqlen
    if n == 0:
        raise SystemExit(f"brq-eval: the text has {len(token_ids)} tokens, fewer than one window of {seqlen}")
    if windows is not None:
        if windows > n:
            raise SystemExit(f"brq-eval: asked for {windows} windows of {seqlen} tokens, the text has only {n}")
        n = windows
    return [token_ids[i * seqlen:(i + 1) * seqlen] for i in range(n)]


def window_nll(prompt_logprobs, token_ids: list[int]) -> float:
    """Sum of -log p(token) over a window's positions 1.. (position 0 has no context)."""
    total = 0.0
    for pos in range(1, len(token_ids)):
        entry = prompt_logprobs[pos]
        total -= entry[token_ids[pos]].logprob
    return total


def perplexity(model: str, text: str, *, seqlen: int, windows: int | None, dtype: str,
               enforce_eager: bool, tensor_parallel_size: int = 1, llm_kwargs: dict | None = None) -> dict:
    """Run vLLM over the windows; return {ppl, nll, tokens, windows, seconds}."""
    from tqdm import tqdm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    wins = make_windows(ids, seqlen, windows)
    llm = LLM(model=model, dtype=dtype, max_model_len=seqlen + 1, enforce_eager=enforce_eager,
              tensor_parallel_size=tensor_parallel_size, seed=0, **(llm_kwargs or {}))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for w in tqdm(wins, desc="windows", unit="win"):
        out = llm.generate([TokensPrompt(prompt_token_ids=w)], params, use_tqdm=False)[0]
        nll += window_nll(out.prompt_logprobs, w)
        count += len(w) - 1
    seconds = time.perf_counter() - t0
    del llm
    return {"ppl": math.exp(nll / count), "nll": nll, "tokens": count, "windows": len(wins), "seconds": seconds}


def run_tasks(model: str, tasks: list[str], dtype: str, enforce_eager: bool) -> dict:
    """Zero-shot tasks through lm-eval's vLLM backend (the brq method loads via its plugin)."""
    try:
        import lm_eval
    except ImportError:
        raise SystemExit("brq-eval: --tasks needs lm-eval: pip install 'vllm-brq[eval]'") from None
    res = lm_eval.simple_evaluate(
        model="vllm", model_args=f"pretrained={model},dtype={dtype},enforce_eager={enforce_eager}", tasks=tasks,
    )
    return {t: res["results"][t] for t in tasks}


def quantization_of(model: str) -> dict | None:
    cfg = Path(model) / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("quantization_config")
    return None


def _engine_kwargs(args) -> dict:
    kw = {"kv_cache_memory_bytes": args.kv_cache_memory_bytes, "gpu_memory_utilization": args.gpu_memory_utilization}
    return {k: v for k, v in kw.items() if v is not None}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="brq-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a BRQ checkpoint folder (or any model vLLM serves, for the baseline)")
    p.add_argument("--text", help="plain-text file to score (default: WikiText-2 test via datasets)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="number of windows (default: all)")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval tasks, e.g. piqa,arc_easy,winogrande")
    p.add_argument("--dtype", default="auto", help="vLLM dtype (float32 on CPU for exact comparisons)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile / CUDA graphs")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="fixed KV cache size (on CPU this avoids vLLM reserving a fraction of the NUMA node)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="GPU memory share vLLM may take (lower it to run several evaluations on one GPU)")
    p.add_argument("--json", dest="json_out", help="write the result here (also printed)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    result = {"model": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
              "quantization_config": quantization_of(args.model),
              "settings": {"seqlen": args.seqlen, "windows": args.windows, "dtype": args.dtype,
                           "enforce_eager": args.enforce_eager, "tensor_parallel_size": args.tensor_parallel_size}}
    if not args.tasks or args.text:
        text, source = load_text(args.text)
        result["settings"]["text"] = source
        result.update(perplexity(args.model, text, seqlen=args.seqlen, windows=args.windows, dtype=args.dtype,
                                 enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
                                 llm_kwargs=_engine_kwargs(args)))
        log.info("perplexity %.3f over %d tokens (%d windows) in %.1f s",
                 result["ppl"], result["tokens"], result["windows"], result["seconds"])
    if args.tasks:
        result["tasks"] = run_tasks(args.model, args.tasks.split(","), args.dtype, args.enforce_eager)
    text = json.dumps(result, indent=2, default=str)
    if args.json_out:
        tmp = Path(args.json_out).with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.json_out)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
