"""brq-convert: Hugging Face model -> block-rotated, GPTQ-quantized MXFP4 checkpoint.

    from vllm_brq.converter import convert
    convert("path/to/model", "out/", quantizer="gptq", calib_file="text.txt")
"""

from .errors import ConvertError
from .pipeline import Options, convert

__all__ = ["convert", "ConvertError", "Options"]
