"""Shared fixtures: the real test assets (cached under .assets/ in the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ASSETS = Path(os.environ.get("BRQ_ASSETS", Path(__file__).resolve().parents[1] / ".assets"))


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
