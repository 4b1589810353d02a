"""Tiny random models of each supported architecture, saved as Hugging Face folders.

Dimensions are multiples of 32 (MXFP4 groups and rotation blocks); norm weights and
biases are randomized so that norm fusion and the v-bias rotation are really exercised.
The SmolLM2 tokenizer files are copied in (the vocabulary size matches it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

VOCAB = 49152
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
             head_dim=32, num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=512)


def build(kind: str, out: Path, tokenizer_dir: Path | None = None, seed: int = 0, **overrides) -> Path:
    """kind: llama | llama_tied | mistral | qwen2 | qwen3 | gpt2 (unsupported)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = dict(SMALL, **overrides)
    if kind == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=VOCAB)
    else:
        cls = {"llama": tf.LlamaConfig, "llama_tied": tf.LlamaConfig, "mistral": tf.MistralConfig,
               "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[kind]
        config = cls(tie_word_embeddings=kind == "llama_tied", **cfg)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_dir / name, out / name)
    return out
