"""Loading BRQ checkpoints into vLLM: general rotations load right, and every malformed
checkpoint fails before serving with one error naming the tensor or key.

Checkpoints come from tests/plugin_checkpoints.py (RTN written directly from the format),
so each case can break exactly one thing.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

import plugin_checkpoints as pc  # noqa: E402
import vllm_harness as vh  # noqa: E402
from vllm_brq import format as fmt  # noqa: E402
from vllm_brq.rotation import block_rotation  # noqa: E402

L0 = "model.layers.0"
L1 = "model.layers.1"


@pytest.fixture(scope="module")
def base(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("loading")
    src = pc.tiny_llama(root / "tiny", smollm2_dir)
    return pc.brq_checkpoint(src, root / "rtn", qkv_rotation=True)


@pytest.mark.slow
def test_rotations_on_fused_linears_load_and_agree(base, smollm2_dir):
    """Per-block [in/32, 32, 32] rotations on the fused q/k/v and the shared [32, 32] R4
    on down_proj: the served logprobs equal the transformers reference."""
    from transformers import AutoTokenizer

    from vllm_brq import hf_reference

    ids = AutoTokenizer.from_pretrained(smollm2_dir)(vh.PROMPT)["input_ids"]
    with vh.inprocess_llm(base) as llm:
        served, served_gen = vh.vllm_prompt_logprobs(llm, ids, max_tokens=16)
    ref, ref_gen = vh.hf_prompt_logprobs(hf_reference.load(base), ids, max_tokens=16)
    assert (served - ref).abs().max().item() < 1e-3
    assert served_gen == ref_gen


def _drop(name):
    return lambda t: t.pop(name)


def _truncate(name):
    def edit(t):
        t[name] = t[name][:-1].contiguous()
    return edit


def _as_float(name):
    def edit(t):
        t[name] = t[name].float()
    return edit


def _replace_rotation(name, r):
    def edit(t):
        t[name] = r
    return edit


CASES = {
    "missing weight_scale": (_drop(f"{L1}.self_attn.k_proj.weight_scale"),
                             f"missing tensor {L1}.self_attn.k_proj.weight_scale"),
    "missing weight_packed": (_drop(f"{L0}.mlp.down_proj.weight_packed"),
                              f"missing tensor {L0}.mlp.down_proj.weight_packed"),
    "misshapen weight_packed": (_truncate(f"{L0}.mlp.up_proj.weight_packed"),
                                f"tensor {L0}.mlp.up_proj.weight_packed has shape"),
    "float weight_scale": (_as_float(f"{L1}.self_attn.o_proj.weight_scale"),
                           f"tensor {L1}.self_attn.o_proj.weight_scale has dtype"),
    "missing R4": (_drop(f"{L1}.mlp.down_proj.input_rotation"),
                   f"missing tensor {L1}.mlp.down_proj.input_rotation"),
    "misshapen rotation": (_replace_rotation(f"{L0}.mlp.down_proj.input_rotation", torch.eye(3)),
                           f"{L0}.mlp.down_proj.input_rotation has shape"),
    "rotation block != block_size": (
        _replace_rotation(f"{L0}.mlp.down_proj.input_rotation", block_rotation(128, 16, 0, "x", True).float()),
        f"{L0}.mlp.down_proj.input_rotation has 16x16 blocks"),
    "fused copies differ": (
        _replace_rotation(f"{L0}.self_attn.k_proj.input_rotation", block_rotation(64, 32, 1, "y").float()),
        f"{L0}.self_attn.k_proj.input_rotation and {L0}.self_attn.q_proj.input_rotation differ"),
    "fused copy missing": (_drop(f"{L0}.self_attn.v_proj.input_rotation"),
                           f"missing tensor {L0}.self_attn.v_proj.input_rotation"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_malformed_tensor_fails_before_serving(base, case):
    edit, message = CASES[case]
    bad = pc.edit_tensors(base, base.parent / case.replace(" ", "_"), edit)
    with pytest.raises(fmt.FormatError, match=message.replace(".", r"\.")):
        with vh.inprocess_llm(bad):
            pass


@pytest.mark.slow
def test_r1_online_needs_rotations_on_qkv_and_gate_up(base, tmp_path):
    """r1_mode "online" puts input_rotation on q/k/v and gate/up; `base` has none on gate/up."""
    import shutil

    bad = shutil.copytree(base, tmp_path / "bad")
    qcfg = pc.quantization_config()
    qcfg["rotation"] = dict(qcfg["rotation"], r1=True, r1_mode="online")
    pc.set_quantization_config(bad, qcfg)
    with pytest.raises(fmt.FormatError, match=r"missing tensor model\.layers\.\d+\.mlp\.gate_proj\.input_rotation"):
        with vh.inprocess_llm(bad):
            pass


@pytest.fixture(scope="module")
def fp8_head(base):
    return pc.with_fp8_head(base, base.parent / "fp8head")


HEAD_CASES = {
    "missing head scale": (_drop("lm_head.weight_scale"), "missing tensor lm_head.weight_scale"),
    "bf16 head weight": (lambda t: t.update({"lm_head.weight": t["lm_head.weight"].to(torch.bfloat16)}),
                         "tensor lm_head.weight has dtype torch.bfloat16, expected float8_e4m3fn"),
    "misshapen head scale": (lambda t: t.update({"lm_head.weight_scale": t["lm_head.weight_scale"][:, None]}),
                             r"tensor lm_head.weight_scale has shape \[49152, 1\]"),
    "NaN head scale": (lambda t: t["lm_head.weight_scale"].__setitem__(3, float("nan")),
                       "lm_head.weight_scale holds NaN"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_malformed_fp8_head_fails_before_serving(fp8_head, case):
    edit, message = HEAD_CASES[case]
    bad = pc.edit_tensors(fp8_head, fp8_head.parent / case.replace(" ", "_"), edit)
    with pytest.raises(fmt.FormatError, match=message):
        with vh.inprocess_llm(bad):
            pass


@pytest.mark.parametrize("key, value", [("format_version", 3), ("activation_format", "int8"),
                                        ("rotation", {"kind": "block_hadamard", "block_size": 24}),
                                        ("rotation", {"kind": "block_hadamard", "block_size": 32, "r1_mode": "sideways"})])
def test_bad_config_fails_before_the_engine(base, key, value, tmp_path):
    """Detected in vLLM's config resolution, before any engine process starts."""
    import shutil

    bad = shutil.copytree(base, tmp_path / "bad")
    qcfg = pc.quantization_config()
    qcfg[key] = value
    pc.set_quantization_config(bad, qcfg)
    # vLLM's config validation (pydantic) wraps the FormatError; its message survives
    with pytest.raises(Exception, match=rf"quantization_config\.{key}"):
        with vh.inprocess_llm(bad):
            pass
