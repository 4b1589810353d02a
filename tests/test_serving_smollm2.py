"""The real model: SmolLM2-135M-Instruct converted with brq-convert (GPTQ, W4A4, block
rotations, calibrated on the Austen novels other than Persuasion), served by `vllm serve`
on CPU: it answers a chat prompt in English, and its perplexity on Persuasion through the
server's prompt logprobs stays within reach of the unquantized model's.

GPTQ on CPU takes minutes, so the converted checkpoint (fixture smollm2_brq_dir) is cached
under the assets folder, keyed by the converter's and the numerics' sources and the options.
"""

from __future__ import annotations

import math
import re

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

import vllm_harness as vh  # noqa: E402

WINDOWS, SEQLEN = 3, 1024


@pytest.fixture(scope="module")
def windows(smollm2_dir, austen_dir):
    from transformers import AutoTokenizer

    text = (austen_dir / "persuasion.txt").read_text()
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(text, add_special_tokens=False)["input_ids"]
    return [ids[i * SEQLEN:(i + 1) * SEQLEN] for i in range(WINDOWS)]


def served_perplexity(server: vh.Server, windows: list[list[int]]) -> float:
    client, nll, count = server.client(), 0.0, 0
    model = client.models.list().data[0].id
    for win in windows:
        r = client.completions.create(model=model, prompt=win, max_tokens=1, temperature=0,
                                      extra_body={"prompt_logprobs": 0})
        plp = r.choices[0].prompt_logprobs
        nll -= sum(plp[i][str(win[i])]["logprob"] for i in range(1, len(win)))
        count += len(win) - 1
    return math.exp(nll / count)


def english_share(text: str, vocabulary: set[str]) -> float:
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in vocabulary for w in words) / max(len(words), 1), len(words)


@pytest.mark.slow
def test_smollm2_w4a4_serves_english_and_keeps_perplexity(smollm2_brq_dir, windows, smollm2_dir, austen_dir):
    converted = smollm2_brq_dir
    server = vh.Server(converted, "--quantization", "brq", "--enforce-eager", max_model_len=SEQLEN + 16)
    try:
        r = server.client().chat.completions.create(
            model=str(converted), temperature=0, max_tokens=24,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
        reply = r.choices[0].message.content
        ppl = served_perplexity(server, windows)
    finally:
        assert server.stop() in (0, -2)
    vocabulary = set(re.findall(r"[a-z]+", (austen_dir / "calibration.txt").read_text().lower()))
    share, n_words = english_share(reply, vocabulary)

    baseline = vh.Server(smollm2_dir, "--enforce-eager", max_model_len=SEQLEN + 16)
    try:
        ppl_fp = served_perplexity(baseline, windows)
    finally:
        assert baseline.stop() in (0, -2)
    print(f"\nSmolLM2 W4A4 GPTQ chat reply: {reply!r}\nPersuasion {WINDOWS}x{SEQLEN} perplexity: "
          f"unquantized {ppl_fp:.2f}, brq W4A4 {ppl:.2f}")
    assert n_words >= 4 and share >= 0.8, reply
    assert ppl_fp < ppl < 2.5 * ppl_fp
