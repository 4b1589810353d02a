"""Tensor parallelism on vLLM-CPU: TP=2 serves the same prompt logprobs as TP=1, and a
TP shard of a quantized input dimension that is not a multiple of 32 fails with a clear
error before serving.

vLLM-CPU binds each worker's threads to a NUMA node and refuses two workers on one node
unless the binding is given by hand: VLLM_CPU_OMP_THREADS_BIND="0|1" (one core each).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("openai")

import plugin_checkpoints as pc  # noqa: E402
import vllm_harness as vh  # noqa: E402

TP2 = ("--enforce-eager", "--tensor-parallel-size", "2")
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 needs two CPU cores")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tp")


def _convert(src):
    from vllm_brq.converter import convert

    return convert(src, src.parent / (src.name + "-w4a4"), quantizer="rtn", dtype="float32")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["brq-convert", "per-block R4"])
def test_tp2_matches_tp1(root, smollm2_dir, kind):
    """brq-convert's shared [32, 32] R4 is replicated; a per-block [in/32, 32, 32] R4 is
    sliced to each row-parallel shard."""
    from transformers import AutoTokenizer

    src = pc.tiny_llama(root / kind.replace(" ", "-"), smollm2_dir)
    ckpt = _convert(src) if kind == "brq-convert" else pc.brq_checkpoint(src, root / "per-block", shared_r4=False)
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(vh.PROMPT)["input_ids"]
    with vh.inprocess_llm(ckpt) as llm:
        tp1, _ = vh.vllm_prompt_logprobs(llm, ids, max_tokens=1)
    server = vh.Server(ckpt, *TP2, env=TP2_ENV)
    try:
        r = server.client().completions.create(model=str(ckpt), prompt=ids, max_tokens=1, temperature=0,
                                               extra_body={"prompt_logprobs": 0})
    finally:
        assert server.stop() in (0, -2)
    plp = r.choices[0].prompt_logprobs
    tp2 = torch.tensor([plp[i][str(ids[i])]["logprob"] for i in range(1, len(ids))], dtype=torch.float64)
    err = (tp1 - tp2).abs().max().item()
    print(f"{kind}: TP=2 vs TP=1 max |logprob diff| {err:.2e}")
    assert err < 1e-4


@pytest.mark.slow
def test_tp_shard_not_multiple_of_32_is_refused(root, smollm2_dir):
    """intermediate 96 -> down_proj shards of 48 inputs: not whole MXFP4 blocks."""
    ckpt = _convert(pc.tiny_llama(root / "odd", smollm2_dir, intermediate_size=96))
    log = root / "odd-server.log"
    with pytest.raises(RuntimeError, match="exited"):
        vh.Server(ckpt, *TP2, env=TP2_ENV, log=log)
    assert ("model.layers.0.mlp.down_proj: the tensor-parallel shard of its input dimension (96 / TP 2 = 48) "
            "is not a multiple of the MXFP4 block 32") in log.read_text()
