"""End-to-end vLLM speed on a GPU: bf16 vs FP8 vs brq W4A4 vs brq W4A16, Llama-3-8B shape.

Runs `vllm bench latency` (batch 1, 512 prompt tokens, 128 output tokens) and
`vllm bench throughput` (256 prompts, 1024 in, 256 out) for each mode, in one session so
the ratios compare like with like, then profiles one batch-1 decode step
(benchmarks/profile_decode.py), and writes benchmarks/results/e2e-<gpu>.json.

Speed does not depend on the weight values, so the model is a Llama-3-8B-shaped one with
random bf16 weights (seed 0), saved as a Hugging Face folder (the bf16 and FP8 baselines
serve it; FP8 is vLLM's online `--quantization fp8`) and converted with RTN into the two
brq checkpoints by the converter's own pipeline. A tokenizer folder is needed for the
random prompts (any Llama-style one; its vocabulary only bounds the ids).

    python benchmarks/bench_e2e.py --tokenizer TOKDIR                      # everything (~25 min)
    python benchmarks/bench_e2e.py --tokenizer TOKDIR --modes brq-w4a4     # resumable: --state keeps
                                                                          # checkpoints and finished rows
    python benchmarks/bench_e2e.py --tokenizer TOKDIR --modes '' --profile '' \
        --latency-only brq-w4a4,brq-w4a4-pdl1 --graph-profile brq-w4a4  # one question, a few minutes

`--latency-only` modes get the batch-1 latency alone (`latency_only_rows`); `--graph-profile`
modes are profiled under CUDA graphs as served (`decode_profile_graphs`, with the wall-clock
step beside the kernel sum).
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
sys.path.insert(0, str(ROOT / "benchmarks"))

MODES = {  # mode -> (checkpoint, vLLM arguments, environment)
    "bf16": ("llama3-8b-random", [], {}),
    "fp8": ("llama3-8b-random", ["--quantization", "fp8"], {}),
    "brq-w4a4": ("llama3-8b-random-brq-w4a4", ["--quantization", "brq"], {}),
    "brq-w4a16": ("llama3-8b-random-brq-w4a16", ["--quantization", "brq"], {}),
    # brq-convert --lm-head fp8 (format version 2): the lm_head in e4m3, its input as FP8 terms per token
    "brq-w4a4-fp8head": ("llama3-8b-random-brq-w4a4-fp8head", ["--quantization", "brq"], {}),
    # brq-convert's defaults since session 16: R1 online and the FP8 head
    "brq-w4a4-r1online-fp8head": ("llama3-8b-random-brq-w4a4-r1online-fp8head", ["--quantization", "brq"], {}),
    # brq-convert --r1-mode online: norm gains kept, q/k/v and gate/up rotate their input (in the norm kernel)
    "brq-w4a4-r1online": ("llama3-8b-random-brq-w4a4-r1online", ["--quantization", "brq"], {}),
    # beside the defaults (not in the default list; benchmarks/NOTES-kernels.md, round 6): the
    # round-5 decode path (no PDL, never persistent); prefill on torch._scaled_mm, not vLLM's CUTLASS
    "brq-w4a4-round5": ("llama3-8b-random-brq-w4a4", ["--quantization", "brq"],
                        {"BRQ_PDL": "0", "BRQ_GEMV_PERSIST": "0", "BRQ_GEMV_ONESHOT": "0"}),
    "brq-w4a4-torchmm": ("llama3-8b-random-brq-w4a4", ["--quantization", "brq"], {"BRQ_FP8_GEMM": "torch"}),
    "brq-w4a4-pdl1": ("llama3-8b-random-brq-w4a4", ["--quantization", "brq"], {"BRQ_PDL": "1"}),  # rounds 6-7
    "brq-w4a4-noonce": ("llama3-8b-random-brq-w4a4", ["--quantization", "brq"],
                        {"BRQ_GEMV_ONESHOT": "0"}),  # through round 11: gate_up's GEMV persistent
    # round 10: the RMSNorms and SiLU-muls kept apart from the brq linears after them (vllm_brq/fusion.py off)
    "brq-w4a4-unfused": ("llama3-8b-random-brq-w4a4", ["--quantization", "brq"], {"BRQ_FUSE": "0"}),
    "brq-w4a4-normfused": ("llama3-8b-random-brq-w4a4", ["--quantization", "brq"], {"BRQ_FUSE": "norm"}),
}
DEFAULT_MODES = ("bf16", "fp8", "brq-w4a4-r1online-fp8head", "brq-w4a16")
BRQ_CHECKPOINTS = {  # checkpoint -> brq-convert options besides RTN and the block rotation (R1 fused
    # and the source-dtype head pinned: the rows measured before those defaults keep their checkpoints)
    "llama3-8b-random-brq-w4a4": dict(activations="mxfp4", r1_mode="fused", lm_head="source"),
    "llama3-8b-random-brq-w4a16": dict(activations="none", r1_mode="fused", lm_head="source"),
    "llama3-8b-random-brq-w4a4-fp8head": dict(activations="mxfp4", lm_head="fp8", r1_mode="fused"),
    "llama3-8b-random-brq-w4a4-r1online": dict(activations="mxfp4", r1_mode="online", lm_head="source"),
    "llama3-8b-random-brq-w4a4-r1online-fp8head": dict(activations="mxfp4", r1_mode="online", lm_head="fp8"),
}
PROFILED = ("bf16", "brq-w4a4-r1online-fp8head")


def _publish(tmp: Path, out: Path) -> Path:
    os.replace(tmp, out)
    return out


def build_checkpoints(models: Path, tokenizer: Path, names: set[str]) -> None:
    """The random bf16 model and the RTN brq conversions among `names` (skipped when present)."""
    import torch

    from convert_time import llama3_8b
    from vllm_brq.converter import pipeline, writer

    models.mkdir(parents=True, exist_ok=True)
    init = "cuda" if torch.cuda.is_available() else "cpu"
    base = models / "llama3-8b-random"
    if not base.exists():
        t0 = time.perf_counter()
        tmp = models / ".tmp-base"
        shutil.rmtree(tmp, ignore_errors=True)
        llama3_8b(32, torch.bfloat16, init).save_pretrained(tmp)
        for f in tokenizer.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, tmp / f.name)
        _publish(tmp, base)
        print(f"random bf16 model written in {time.perf_counter() - t0:.0f} s", flush=True)
    for name, options in BRQ_CHECKPOINTS.items():
        out = models / name
        if out.exists() or name not in names:
            continue
        t0 = time.perf_counter()
        opts = pipeline.Options(quantizer="rtn", rotation="block", **options)
        model = llama3_8b(32, torch.bfloat16, init)
        report = pipeline.run(model, opts)
        tmp = models / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        qcfg = pipeline.quantization_config(opts, report)
        writer.write_checkpoint(tmp, model, base, qcfg,
                                writer.model_card(str(base), qcfg, opts.command(str(base), str(out)), report))
        _publish(tmp, out)
        print(f"{out.name} converted in {time.perf_counter() - t0:.0f} s", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the engines below need the GPU memory the random init cached


def vllm_bench(kind: str, model: Path, extra: list[str], out_json: Path, log: Path, env: dict) -> dict:
    common = ["--model", str(model), "--max-model-len", "2048", "--seed", "0"]
    if kind == "latency":
        args = ["--input-len", "512", "--output-len", "128", "--batch-size", "1", "--num-iters-warmup", "3", "--num-iters", "10"]
    else:
        args = ["--input-len", "1024", "--output-len", "256", "--num-prompts", "256"]
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", kind, *common, *args, *extra,
           "--output-json", str(out_json)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}).returncode
    if rc:
        raise RuntimeError(f"vllm bench {kind} failed ({rc}); see {log}:\n{log.read_text()[-3000:]}")
    res = json.loads(out_json.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, type=Path)
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    p.add_argument("--profile", default=",".join(PROFILED), help="modes whose decode step is profiled ('' for none)")
    p.add_argument("--latency-only", default="", help="modes timed by `vllm bench latency` only")
    p.add_argument("--graph-profile", default="", help="modes whose decode step is profiled under CUDA graphs")
    p.add_argument("--state", type=Path, default=Path.home() / "e2e", help="keeps checkpoints and finished rows")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/e2e-<gpu>.json)")
    args = p.parse_args(argv)
    import torch

    gpu = torch.cuda.get_device_name(0)
    state = args.state
    (state / "rows").mkdir(parents=True, exist_ok=True)
    wanted = {m for arg in (args.modes, args.profile, args.latency_only, args.graph_profile) for m in arg.split(",") if m}
    build_checkpoints(state / "models", args.tokenizer, {MODES[m][0] for m in wanted})
    for mode in filter(None, args.modes.split(",")):
        row_file = state / "rows" / f"{mode}.json"
        if row_file.exists():
            continue
        ckpt, extra, env = MODES[mode]
        d = state / "models" / ckpt
        lat = vllm_bench("latency", d, extra, state / f"{mode}-latency.json", state / f"{mode}-latency.log", env)
        thr = vllm_bench("throughput", d, extra, state / f"{mode}-throughput.json", state / f"{mode}-throughput.log",
                         env)
        row = {"mode": mode, "latency_s": lat["avg_latency"], "throughput_tok_s": thr["tokens_per_second"],
               "requests_s": thr.get("requests_per_second"),
               "output_tok_s": thr["tokens_per_second"] * 256 / (1024 + 256),
               "engine_wall_s": round(lat["wall_s"] + thr["wall_s"], 1), "latencies_s": lat.get("latencies")}
        row_file.write_text(json.dumps(row))
        print(json.dumps(row), flush=True)
    for mode in filter(None, args.latency_only.split(",")):
        row_file = state / "rows" / f"latency-{mode}.json"
        if row_file.exists():
            continue
        ckpt, extra, env = MODES[mode]
        lat = vllm_bench("latency", state / "models" / ckpt, extra, state / f"{mode}-latency.json",
                         state / f"{mode}-latency.log", env)
        row_file.write_text(json.dumps({"mode": mode, "latency_s": lat["avg_latency"],
                                        "engine_wall_s": round(lat["wall_s"], 1), "latencies_s": lat.get("latencies")}))
        print(row_file.read_text(), flush=True)
    for kind, modes in (("profile", args.profile), ("profile-graphs", args.graph_profile)):
        for mode in filter(None, modes.split(",")):
            prof = state / "rows" / f"{kind}-{mode}.json"
            if not prof.exists():
                ckpt, extra, env = MODES[mode]
                cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_decode.py"), str(state / "models" / ckpt),
                       "--out", str(prof), *extra, *(["--graphs"] if kind == "profile-graphs" else [])]
                subprocess.run(cmd, check=True, env={**os.environ, **env})

    def saved(prefix: str) -> dict:
        return {m: json.loads((state / "rows" / f"{prefix}{m}.json").read_text())
                for m in MODES if (state / "rows" / f"{prefix}{m}.json").exists()}
    rows = list(saved("").values())
    import vllm

    result = {"device": gpu, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "vllm": vllm.__version__,
              "model": "Llama-3-8B shape, random bf16 weights (seed 0); brq: RTN, block rotation 32",
              "latency": "vllm bench latency: batch 1, 512 in, 128 out (3 warmup, 10 iterations)",
              "throughput": "vllm bench throughput: 256 prompts, 1024 in, 256 out; tokens/s counts input and output",
              "command": "python benchmarks/bench_e2e.py --tokenizer TOKDIR", "rows": rows,
              "decode_profile": saved("profile-")}
    if latency_only := saved("latency-"):
        result["latency_only_rows"] = list(latency_only.values())
    if graph_profiles := saved("profile-graphs-"):
        result["decode_profile_graphs"] = graph_profiles
    short = next((t for t in gpu.split() if any(c.isdigit() for c in t)), gpu.split()[-1]).lower()  # "h100"
    out = args.out or ROOT / "benchmarks" / "results" / f"e2e-{short}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"]) / out.name
        if dest.resolve() != out.resolve():
            shutil.copy(out, dest)


def markdown(result: dict) -> str:
    """The README table: latency, throughput and their ratios to bf16 and FP8 (and the machine lease
    of each row when the rows carry one: rows merged from several leases say so)."""
    by = {r["mode"]: r for r in result["rows"]}
    leases = any("lease" in r for r in result["rows"])
    lines = ["| mode | batch-1 latency (s) | vs bf16 | vs fp8 | throughput (tok/s) | vs bf16 | vs fp8 |"
             + (" lease |" if leases else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if leases else "")]
    for r in result["rows"]:
        cells = [r["mode"], f"{r['latency_s']:.3f}"]
        cells += [f"{by[b]['latency_s'] / r['latency_s']:.2f}x" if b in by else "-" for b in ("bf16", "fp8")]
        cells.append(f"{r['throughput_tok_s']:,.0f}")
        cells += [f"{r['throughput_tok_s'] / by[b]['throughput_tok_s']:.2f}x" if b in by else "-" for b in ("bf16", "fp8")]
        cells += [r.get("lease", "-")] if leases else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
