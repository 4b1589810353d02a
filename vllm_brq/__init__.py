"""vllm-brq: block-rotated MXFP4 (W4A4) checkpoints and their vLLM quantization method."""

__version__ = "0.1.0"
