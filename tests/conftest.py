"""Shared fixtures: the real test assets (cached under .assets/ in the repo)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("BRQ_ASSETS", REPO / ".assets"))
# The BRQ checkpoint of SmolLM2 the serving and accuracy-regression tests share: block
# rotation + GPTQ, W4A4, small calibration so CPU conversion takes minutes, not hours.
SMOLLM2_BRQ_OPTIONS = dict(quantizer="gptq", activations="mxfp4", nsamples=8, seqlen=256, dtype="float32")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder (see vllm_brq.assets)."""
    from vllm_brq import assets

    return assets.smollm2(ASSETS / "smollm2")


@pytest.fixture(scope="session")
def austen_dir() -> Path:
    """The six Austen novels as text; calibration.txt excludes Persuasion."""
    from vllm_brq import assets

    return assets.austen(ASSETS / "austen")


def _converter_key(options: dict) -> str:
    """Hash of the options and of every source that shapes a converted checkpoint."""
    h = hashlib.sha256(repr(sorted(options.items())).encode())
    sources = [*REPO.glob("converter/*.py"), *(REPO / "vllm_brq").glob("*.py"), REPO / "kernels" / "reference.py"]
    for f in sorted(sources):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def smollm2_brq_dir(smollm2_dir, austen_dir) -> Path:
    """SmolLM2 converted by brq-convert (cached under .assets/converted, keyed by sources)."""
    from vllm_brq.converter import convert

    out = ASSETS / "converted" / f"smollm2-gptq-w4a4-{_converter_key(SMOLLM2_BRQ_OPTIONS)}"
    if not (out / "config.json").exists():
        convert(smollm2_dir, out, calib_file=str(austen_dir / "calibration.txt"), **SMOLLM2_BRQ_OPTIONS)
    return out
