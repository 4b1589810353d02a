"""CI guard on accuracy: BRQ (block rotation + GPTQ, W4A4) on the real SmolLM2, scored by
`brq-eval` (vLLM prompt logprobs) on a slice of Persuasion, must stay within a tolerance of
the recorded value in benchmarks/results/accuracy-ci-slice.json.

After an intended change in accuracy, re-record with
    BRQ_RECORD_ACCURACY=1 python -m pytest tests/test_accuracy_regression.py
and commit the JSON with the change that moved it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SMOLLM2_BRQ_OPTIONS

pytest.importorskip("vllm")

RECORD = REPO / "benchmarks" / "results" / "accuracy-ci-slice.json"
SLICE = {"seqlen": 512, "windows": 4}
WORSE_TOLERANCE = 0.03  # a 3 % higher perplexity fails
BETTER_TOLERANCE = 0.15  # a large drop is suspicious too (e.g. activation quantization dropped)


def brq_eval(model: Path, text: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "vllm_brq.evaluate", str(model), "--text", str(text),
           "--seqlen", str(SLICE["seqlen"]), "--windows", str(SLICE["windows"]), "--dtype", "float32",
           "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_brq_perplexity_does_not_regress(smollm2_brq_dir, austen_dir, tmp_path):
    res = brq_eval(smollm2_brq_dir, austen_dir / "persuasion.txt", tmp_path / "eval.json")
    assert res["quantization_config"]["activation_format"] == "mxfp4"
    if os.environ.get("BRQ_RECORD_ACCURACY"):
        RECORD.write_text(json.dumps({
            "what": "brq-eval perplexity of SmolLM2-135M converted by brq-convert on a slice of Persuasion",
            "convert_options": SMOLLM2_BRQ_OPTIONS, "calibration": "Austen novels other than Persuasion",
            "slice": SLICE, "ppl": res["ppl"], "tokens": res["tokens"],
            "command": "BRQ_RECORD_ACCURACY=1 python -m pytest tests/test_accuracy_regression.py"}, indent=1) + "\n")
    rec = json.loads(RECORD.read_text())
    assert res["tokens"] == rec["tokens"]
    assert res["ppl"] <= rec["ppl"] * (1 + WORSE_TOLERANCE), (
        f"BRQ perplexity regressed: {res['ppl']:.3f} vs recorded {rec['ppl']:.3f} (+{WORSE_TOLERANCE:.0%} allowed)")
    assert res["ppl"] >= rec["ppl"] * (1 - BETTER_TOLERANCE), (
        f"BRQ perplexity dropped to {res['ppl']:.3f} from {rec['ppl']:.3f}: check that W4A4 still quantizes, "
        "then re-record (see the module docstring)")
