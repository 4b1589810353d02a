"""Time a GPTQ conversion of a random-weight Llama-3-8B-shaped model (the README's number).

    python benchmarks/convert_time.py                  # 32 layers, 128 x 2048 calibration
    python benchmarks/convert_time.py --layers 4       # quicker; scale by 32/4 for the full model

Synthetic calibration (random token ids) has the same cost as text. Times the whole
converter path after loading: norm fusion + rotations, layer-by-layer calibration with
GPTQ, and writing the checkpoint. Prints seconds per phase and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from vllm_brq.converter import pipeline, writer


def llama3_8b(layers: int, dtype: torch.dtype, init_device: str = "cpu"):
    """A Llama-3-8B-shaped model with random weights (seed 0), returned on the CPU.
    ``init_device="cuda"`` draws the 8B random numbers on the GPU (seconds, not minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, num_hidden_layers=layers, vocab_size=128256,
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(init_device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.to("cpu").eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--quantizer", default="gptq", choices=("gptq", "rtn"))
    p.add_argument("--rotation", default="block")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    t0 = time.monotonic()
    model = llama3_8b(args.layers, getattr(torch, args.dtype))
    build = time.monotonic() - t0
    opts = pipeline.Options(quantizer=args.quantizer, rotation=args.rotation, device=args.device,
                            nsamples=args.nsamples, seqlen=args.seqlen)
    ids = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    t0 = time.monotonic()
    report = pipeline.run(model, opts, ids=ids)
    quantize = time.monotonic() - t0
    qcfg = pipeline.quantization_config(opts, report)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        writer.write_checkpoint(Path(tmp), model, Path(tmp), qcfg, "benchmark")
        write = time.monotonic() - t0
    pipeline.log_summary(report, quantize + write)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    result = {"layers": args.layers, "nsamples": args.nsamples, "seqlen": args.seqlen, "quantizer": args.quantizer,
              "device": name, "build_s": round(build, 1), "convert_s": round(quantize, 1), "write_s": round(write, 1),
              "convert_s_per_layer": round(quantize / args.layers, 2),
              "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.startswith("cuda") else None}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
