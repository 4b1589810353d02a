"""``brq-convert MODEL OUT [options]``: the command-line face of ``vllm_brq.converter.convert``."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from vllm_brq.format import FormatError

from .errors import ConvertError
from .pipeline import CHOICES, Options


def parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(
        prog="brq-convert",
        description="Convert a Hugging Face Llama/Mistral/Qwen2/Qwen3 model into a block-rotated "
                    "MXFP4 (BRQ) checkpoint that `vllm serve OUT --quantization brq` loads.")
    p.add_argument("model", help="local model folder or Hugging Face hub id")
    p.add_argument("out", help="output folder (written atomically)")
    g = p.add_argument_group("rotation")
    g.add_argument("--rotation", choices=CHOICES["rotation"], default=d.rotation,
                   help="block: randomized block Hadamard (BRQ); global: one rotation over the whole dimension (QuaRot-style baseline); none")
    g.add_argument("--rotation-block-size", type=int, choices=CHOICES["rotation_block_size"],
                   default=d.rotation_block_size, help="block size of --rotation block (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the random signs (default %(default)s)")
    for r, where in (("r1", "hidden size"), ("r2", "per attention head, v/o"), ("r4", "down_proj input, online")):
        g.add_argument(f"--no-{r}", dest=r, action="store_false", help=f"skip {r.upper()} ({where})")
    g.add_argument("--r1-mode", choices=CHOICES["r1_mode"], default=d.r1_mode,
                   help="online: keep the RMSNorm gains in the norms and rotate q/k/v/gate/up's input online "
                        "(more accurate); fused: fold the gains into the weights and R1 into the residual stream; "
                        "auto (default): online with --rotation block, else fused")
    g = p.add_argument_group("quantization")
    g.add_argument("--quantizer", choices=CHOICES["quantizer"], default=d.quantizer,
                   help="gptq (default), rtn (round to nearest), none (rotate only, keep the source dtype)")
    g.add_argument("--scale-search", action="store_true",
                   help="GPTQ: pick each group's power-of-two scale among neighbouring exponents")
    g.add_argument("--activations", choices=CHOICES["activations"], default=d.activations,
                   help="mxfp4: W4A4 (default); none: W4A16")
    g.add_argument("--lm-head", choices=CHOICES["lm_head"], default=d.lm_head,
                   help="fp8: e4m3 weights (GPTQ with --quantizer gptq) and the input as two FP8 terms per "
                        "token, half the bytes of the largest decode read (format version 2); source: keep the "
                        "source dtype; auto (default): fp8 unless --quantizer none")
    g = p.add_argument_group("calibration (GPTQ)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--calib", default=d.calib, choices=("wikitext2",), help="dataset (needs network; default)")
    src.add_argument("--calib-file", help="local .txt or .jsonl (a 'text' field per line)")
    g.add_argument("--nsamples", type=int, default=d.nsamples, help="windows (default %(default)s)")
    g.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per window (default %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--device", help="compute device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=CHOICES["dtype"], default=d.dtype,
                   help="load/compute dtype (default: the model's; float32 is much faster on CPUs)")
    g.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .pipeline import convert

    options = {k: v for k, v in vars(args).items() if k not in ("model", "out")}
    try:
        out = convert(args.model, args.out, command=shlex.join(["brq-convert", *argv]), **options)
    except (ConvertError, FormatError) as e:
        print(f"brq-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
