"""End-to-end vLLM speed on a GPU: bf16 vs FP8 vs brq W4A4 vs brq W4A16, Llama-3-8B shape.

Runs `vllm bench latency` (batch 1, 512 prompt tokens, 128 output tokens) and
`vllm bench throughput` (256 prompts, 1024 in, 256 out) for each mode, in one session so
the ratios compare like with like, and writes benchmarks/results/e2e-<gpu>.json.

Speed does not depend on the weight values, so the models are made with vLLM's dummy
weights from a Llama-3-8B config (a brq checkpoint's config carries the brq
quantization_config; the packed weights get random bytes). A tokenizer folder is needed
for the random prompts (any Llama-style one; its vocabulary only bounds the ids).

    python benchmarks/bench_e2e.py --tokenizer TOKDIR --modes bf16,fp8,brq-w4a4,brq-w4a16
    python benchmarks/bench_e2e.py --tokenizer TOKDIR --modes brq-w4a4 --state ~/e2e   # resumable
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}
MODES = {
    "bf16": ({}, []),
    "fp8": ({}, ["--quantization", "fp8"]),
    "brq-w4a4": ({"activation_format": "mxfp4"}, ["--quantization", "brq"]),
    "brq-w4a16": ({"activation_format": "none"}, ["--quantization", "brq"]),
}


def model_dir(mode: str, state: Path, tokenizer: Path) -> Path:
    """A config-only model folder (weights come from --load-format dummy)."""
    from vllm_brq import format as fmt

    d = state / "models" / mode
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    cfg = dict(LLAMA3_8B)
    over, _ = MODES[mode]
    if over:
        cfg["quantization_config"] = fmt.build_config(
            activation_format=over["activation_format"],
            rotation={"kind": "block_hadamard", "block_size": 32, "seed": 0, "r1": True, "r2": True, "r4": True},
            quantizer={"method": "rtn"}, converter="bench_e2e (dummy weights)")
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, d / f.name)
    return d


def vllm_bench(kind: str, model: Path, extra: list[str], out_json: Path, log: Path) -> dict:
    common = ["--model", str(model), "--load-format", "dummy", "--max-model-len", "2048", "--seed", "0"]
    if kind == "latency":
        args = ["--input-len", "512", "--output-len", "128", "--batch-size", "1", "--num-iters-warmup", "3", "--num-iters", "10"]
    else:
        args = ["--input-len", "1024", "--output-len", "256", "--num-prompts", "256"]
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", kind, *common, *args, *extra,
           "--output-json", str(out_json)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"vllm bench {kind} failed ({rc}); see {log}")
    res = json.loads(out_json.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, type=Path)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--state", type=Path, default=Path.home() / "e2e", help="keeps finished modes (resumable)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/e2e-<gpu>.json)")
    args = p.parse_args(argv)
    import torch

    gpu = torch.cuda.get_device_name(0)
    state = args.state
    (state / "rows").mkdir(parents=True, exist_ok=True)
    for mode in args.modes.split(","):
        row_file = state / "rows" / f"{mode}.json"
        if row_file.exists():
            continue
        d = model_dir(mode, state, args.tokenizer)
        _, extra = MODES[mode]
        lat = vllm_bench("latency", d, extra, state / f"{mode}-latency.json", state / f"{mode}-latency.log")
        thr = vllm_bench("throughput", d, extra, state / f"{mode}-throughput.json", state / f"{mode}-throughput.log")
        row = {"mode": mode, "latency_s": lat["avg_latency"], "throughput_tok_s": thr["tokens_per_second"],
               "requests_s": thr.get("requests_per_second"),
               "output_tok_s": thr["tokens_per_second"] * 256 / (1024 + 256)}
        row_file.write_text(json.dumps(row))
        print(json.dumps(row), flush=True)
    rows = [json.loads((state / "rows" / f"{m}.json").read_text()) for m in MODES if (state / "rows" / f"{m}.json").exists()]
    import vllm

    result = {"device": gpu, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "vllm": vllm.__version__, "model": "Llama-3-8B shape, dummy weights",
              "latency": "batch 1, 512 in, 128 out", "throughput": "256 prompts, 1024 in, 256 out",
              "command": "python benchmarks/bench_e2e.py --tokenizer TOKDIR", "rows": rows}
    out = args.out or ROOT / "benchmarks" / "results" / f"e2e-{gpu.split()[-1].lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    base = {r["mode"]: r for r in rows}.get("bf16")
    print("| mode | latency (s) | throughput (tok/s) | vs bf16 |")
    for r in rows:
        ratio = f"{r['throughput_tok_s'] / base['throughput_tok_s']:.2f}x" if base else "-"
        print(f"| {r['mode']} | {r['latency_s']:.3f} | {r['throughput_tok_s']:.0f} | {ratio} |")
    if os.environ.get("OUT"):
        shutil.copy(out, Path(os.environ["OUT"]) / out.name)


if __name__ == "__main__":
    main()
