"""Bad input: a specific ConvertError, and OUT (and any temporary folder) absent afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models
from vllm_brq.converter import ConvertError, convert
from vllm_brq.converter.cli import main


def _fails(tmp_path: Path, model, match: str, out: Path | None = None, **options) -> None:
    out = out or tmp_path / "out"
    with pytest.raises(ConvertError, match=match):
        convert(model, out, device="cpu", **options)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def llama(tmp_path_factory, smollm2_dir) -> Path:
    return tiny_models.build("llama", tmp_path_factory.mktemp("src") / "llama", smollm2_dir)


def test_missing_local_model(tmp_path):
    _fails(tmp_path, tmp_path / "nope", "not found")


def test_hub_id_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(tmp_path, "no-such-org/no-such-model", "could not be fetched from the Hugging Face Hub")


def test_folder_without_weights(tmp_path, llama):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((llama / "config.json").read_text())
    _fails(tmp_path, bare, r"no weights")


def test_unsupported_architecture(tmp_path):
    src = tiny_models.build("gpt2", tmp_path / "gpt2")
    _fails(tmp_path, src, r"unsupported architecture 'gpt2'.*Llama.*Mistral.*Qwen2.*Qwen3")


def test_dimension_not_divisible(tmp_path):
    src = tiny_models.build("llama", tmp_path / "odd", intermediate_size=144)
    _fails(tmp_path, src, r"intermediate_size = 144 is not divisible by the block size 32")


def test_rotation_block_must_divide_head_dim(tmp_path):
    src = tiny_models.build("llama", tmp_path / "hd", head_dim=32)
    _fails(tmp_path, src, r"head_dim \(R2\) = 32 is not divisible by the block size 64", rotation_block_size=64)


def test_out_exists_without_overwrite(tmp_path, llama):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(ConvertError, match="already exists; pass --overwrite"):
        convert(llama, out, quantizer="rtn")
    assert (out / "keep").read_text() == "mine"


def test_unwritable_out(tmp_path, llama):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConvertError, match="cannot write"):
        convert(llama, blocker / "out", quantizer="rtn")
    assert blocker.read_text() == "not a folder"


def test_calibration_text_too_short(tmp_path, llama):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words of calibration text.")
    _fails(tmp_path, llama, r"calibration text has \d+ tokens; --nsamples 4 x --seqlen 64 needs 256",
           calib_file=str(text), nsamples=4, seqlen=64)


def test_bad_calibration_file(tmp_path, llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    _fails(tmp_path, llama, r"bad.jsonl:1 is not a JSON object with a 'text' field", calib_file=str(bad))


def test_nan_weights(tmp_path, llama):
    src = tmp_path / "nan"
    src.mkdir()
    for f in llama.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = torch.nan
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _fails(tmp_path, src, r"model.layers.1.mlp.up_proj.weight contains NaN or Inf", quantizer="rtn")


def test_failure_inside_the_pipeline_leaves_no_output(tmp_path, llama, monkeypatch):
    from vllm_brq.converter import writer

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "save_file", boom)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        convert(llama, out, quantizer="rtn", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_error_and_exit_code(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "brq-convert: error: model" in capsys.readouterr().err
