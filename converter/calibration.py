"""Calibration text -> token windows [nsamples, seqlen].

Sources: WikiText-2 train (through ``datasets``, needs a network or a local datasets
cache) or a local .txt / .jsonl ("text" field per line) file. The windows are
non-overlapping and spread evenly over the whole text, so the result depends only on the
text, the tokenizer and the two sizes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .errors import ConvertError

log = logging.getLogger(__name__)


def load_text(calib: str = "wikitext2", calib_file: str | Path | None = None) -> tuple[str, str]:
    """(text, description of its source)."""
    if calib_file is not None:
        path = Path(calib_file)
        if not path.is_file():
            raise ConvertError(f"calibration file {path} does not exist")
        if path.suffix == ".jsonl":
            lines = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        lines.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ConvertError(f"{path}:{i} is not a JSON object with a 'text' field") from None
            return "\n\n".join(lines), f"file {path.name} (jsonl)"
        if path.suffix == ".txt":
            return path.read_text(encoding="utf-8"), f"file {path.name}"
        raise ConvertError(f"calibration file {path} must end in .txt or .jsonl")
    if calib != "wikitext2":
        raise ConvertError(f"unknown calibration set {calib!r}; use wikitext2 or --calib-file PATH")
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
    except Exception as e:  # offline, no cache, datasets missing: all mean the same to a user
        raise ConvertError(
            f"cannot load WikiText-2 through `datasets` ({type(e).__name__}: {e}); "
            "without network access use --calib-file PATH (.txt or .jsonl)"
        ) from None
    return "\n\n".join(ds["text"]), "wikitext-2-raw-v1 train"


def token_windows(tokenizer, text: str, nsamples: int, seqlen: int) -> torch.Tensor:
    """``nsamples`` non-overlapping windows of ``seqlen`` tokens, evenly spread over ``text``."""
    if nsamples < 1 or seqlen < 1:
        raise ConvertError(f"--nsamples and --seqlen must be positive (got {nsamples}, {seqlen})")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    need = nsamples * seqlen
    if ids.numel() < need:
        raise ConvertError(
            f"calibration text has {ids.numel()} tokens; --nsamples {nsamples} x --seqlen {seqlen} "
            f"needs {need}: give more text or ask for fewer/shorter samples"
        )
    span = ids.numel() - seqlen
    starts = [0] if nsamples == 1 else [k * span // (nsamples - 1) for k in range(nsamples)]
    log.info("calibration: %d windows of %d tokens from %d tokens", nsamples, seqlen, ids.numel())
    return torch.stack([ids[s: s + seqlen] for s in starts])
