"""The ``vllm.general_plugins`` entry point: registers the quantization method "brq".

vLLM calls ``register()`` in every process it starts (API server, engine core, workers),
possibly more than once, before it reads any model config. It must therefore be cheap
(vLLM's own imports are already paid for by then) and idempotent.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Register ``BRQQuantConfig`` under the name "brq" (once per process)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from vllm_brq import format as fmt
    from vllm_brq.vllm_method import BRQQuantConfig

    register_quantization_config(fmt.QUANT_METHOD)(BRQQuantConfig)
    _log_like_vllm()
    _registered = True
    logger.debug("registered vLLM quantization method %r", fmt.QUANT_METHOD)


def _log_like_vllm() -> None:
    """The plugin's loggers (``vllm_brq.*``) write through vLLM's handlers at vLLM's level, so its
    INFO lines (FP8 weight copies, the norm fusion) appear in the server log in vLLM's format."""
    ours, theirs = logging.getLogger("vllm_brq"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False
