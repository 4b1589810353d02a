"""Served numbers agree with the transformers reference of the same checkpoint.

A tiny Llama is converted with brq-convert (RTN: W4A4, W4A4 with the FP8 lm_head, W4A16, and
--quantizer none; W4A4 and none again with R1 online) and
served by vLLM (CPU, fp32, reference kernels). Its prompt logprobs must match
vllm_brq.hf_reference (which simulates the same W4A4 math on the rotated model in
transformers) within 1e-3, and its greedy continuation must agree for >= 60 of 64 tokens.
The none checkpoints are compared with the original, unrotated model: the rotations are
exact, so serving it must not change the model.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

import plugin_checkpoints as pc  # noqa: E402
import vllm_harness as vh  # noqa: E402

TOL = 1e-3
MIN_GREEDY = 60
CASES = {  # name -> brq-convert options
    "w4a4": dict(quantizer="rtn", activations="mxfp4"),
    "w4a4-fp8head": dict(quantizer="rtn", activations="mxfp4", lm_head="fp8"),  # format version 2
    "w4a16": dict(quantizer="rtn", activations="none"),
    "none": dict(quantizer="none", activations="none"),
    # R1 online: norm gains (times R1's signs) kept, q/k/v/gate/up rotate their input (vLLM's fused
    # qkv_proj / gate_up_proj load one copy per shard)
    "w4a4-r1online": dict(quantizer="rtn", activations="mxfp4", r1_mode="online"),
    "none-r1online": dict(quantizer="none", activations="none", r1_mode="online"),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory, smollm2_dir):
    return pc.tiny_llama(tmp_path_factory.mktemp("agree") / "tiny", smollm2_dir)


@pytest.fixture(scope="module")
def prompt_ids(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)(vh.PROMPT)["input_ids"]


@pytest.fixture(scope="module")
def original(source, prompt_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    return vh.hf_prompt_logprobs(model, prompt_ids)


def convert(source, case):
    from vllm_brq.converter import convert as brq_convert

    return brq_convert(source, source.parent / case, dtype="float32", **CASES[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_served_logprobs_match_reference(source, prompt_ids, original, case):
    from vllm_brq import hf_reference

    ckpt = convert(source, case)
    with vh.inprocess_llm(ckpt) as llm:
        served_lp, served_gen = vh.vllm_prompt_logprobs(llm, prompt_ids)
    if case.startswith("none"):
        ref_lp, ref_gen = original
    else:
        ref_lp, ref_gen = vh.hf_prompt_logprobs(hf_reference.load(ckpt), prompt_ids)
    err = (served_lp - ref_lp).abs().max().item()
    same = sum(a == b for a, b in zip(served_gen, ref_gen))
    print(f"{case}: max |logprob diff| {err:.2e}, greedy {same}/64 same, common prefix "
          f"{vh.common_prefix(served_gen, ref_gen)}")
    assert err < TOL
    assert len(served_gen) == 64 and same >= MIN_GREEDY
    if not case.startswith("none"):  # the quantization really happened (no silent fallback to fp)
        assert (served_lp - original[0]).abs().max().item() > 10 * TOL
