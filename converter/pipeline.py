"""brq-convert orchestration: checks, load, fuse + rotate, quantize layer by layer, write.

Calibration runs one decoder layer at a time on the compute device: the calibration
hidden states enter layer i, each group of linears that reads one input (q/k/v, o,
gate/up, down) is quantized in turn on the inputs it sees with the earlier groups (and
all earlier layers) already quantized, then the fully quantized layer's outputs feed
layer i+1. Quantized linears run the served linear's reference (``ReferenceLinear``):
MXFP4 weights and, for W4A4, MXFP4 activations, so later layers see what vLLM will feed
them. The GPTQ Hessian itself is built from the linear's rotated but *unquantized*
input X (as in QuaRot/SpinQuant/MR-GPTQ): GPTQ minimizes ||X W^T - X Q^T||, and the
activation rounding is a separate, weight-independent error.
Peak device memory: one decoder layer, the calibration hidden states (twice) and one
chunk's intermediate activations.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import vllm_brq
from vllm_brq import format as fmt
from vllm_brq import mxfp4
from vllm_brq.hf_reference import Fp8Head, ReferenceLinear
from vllm_brq.kernels.reference import fp8_head_weights_reference, fp8_row_scales
from vllm_brq.rotation import rotate

from . import architectures as arch
from . import calibration, fuse, writer
from .errors import ConvertError
from .gptq import GPTQ

log = logging.getLogger(__name__)

CHOICES = {
    "rotation": ("block", "global", "none"),
    "rotation_block_size": (16, 32, 64),
    "quantizer": ("gptq", "rtn", "none"),
    "activations": ("mxfp4", "none"),
    "lm_head": ("auto", "source", "fp8"),
    "r1_mode": ("auto", *fmt.R1_MODES),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
}
CHUNK_TOKENS = 8192  # tokens per layer forward during calibration


@dataclass(frozen=True)
class Options:
    """Every brq-convert option (the CLI flags, same names with underscores)."""

    rotation: str = "block"
    rotation_block_size: int = 32
    seed: int = 0
    r1: bool = True
    r1_mode: str = "auto"  # online with block rotations (kernels fuse a 32-block R), else fused
    r2: bool = True
    r4: bool = True
    quantizer: str = "gptq"
    scale_search: bool = False
    activations: str = "mxfp4"
    lm_head: str = "auto"  # fp8 unless the quantizer is none
    calib: str = "wikitext2"
    calib_file: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    device: str | None = None
    overwrite: bool = False
    dtype: str = "auto"

    def __post_init__(self):
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConvertError(f"--{key.replace('_', '-')} {getattr(self, key)!r} is not one of {list(allowed)}")

    @property
    def r1_online(self) -> bool:
        """R1 applied online (norm gains kept): --r1-mode online, or auto with --rotation block."""
        r1 = self.rotated[0]
        return r1 and (self.r1_mode == "online" or self.r1_mode == "auto" and self.rotation == "block")

    @property
    def head_format(self) -> str:
        """lm_head_format of the checkpoint: --lm-head, where auto is fp8 unless nothing is quantized."""
        if self.lm_head == "auto":
            return "source" if self.quantizer == "none" else "fp8"
        return self.lm_head

    @property
    def rotated(self) -> tuple[bool, bool, bool]:
        on = self.rotation != "none"
        return on and self.r1, on and self.r2, on and self.r4

    def command(self, model: str, out: str) -> str:
        """The brq-convert command line equivalent to these options."""
        parts = ["brq-convert", model, str(out)]
        for f in fields(self):
            value, default = getattr(self, f.name), f.default
            if value == default or f.name == "overwrite":
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.name in ("r1", "r2", "r4"):
                parts.append(f"--no-{f.name}")
            elif isinstance(value, bool):
                parts.append(flag)
            else:
                parts += [flag, str(value)]
        return " ".join(parts)


@dataclass
class LinearStats:
    """Errors of one quantized linear: relative weight error ||W-Q||/||W|| and relative
    output error ||X(W-Q)^T||/||XW^T|| (output errors need calibration data)."""

    name: str
    weight_rtn: float
    weight_q: float
    output_rtn: float | None = None
    output_q: float | None = None


@dataclass
class Report:
    stats: list[LinearStats] = field(default_factory=list)
    layer_seconds: list[float] = field(default_factory=list)
    calibration: dict | None = None
    untied_lm_head: bool = False
    head_weight_error: float | None = None  # relative, of an FP8 lm_head
    head_output_error: float | None = None  # relative, on the calibration data (GPTQ only)


def convert(model: str | os.PathLike, out: str | os.PathLike, *, command: str | None = None, **options) -> Path:
    """Convert a Hugging Face model (local folder or hub id) into a BRQ checkpoint at ``out``.

    ``options`` are the CLI options (see ``Options``). Writes into a temporary folder next
    to ``out`` and renames it when complete; on any error ``out`` is left as it was."""
    try:
        opts = Options(**options)
    except TypeError as e:
        raise ConvertError(f"unknown option: {e}") from None
    out = Path(out).absolute()
    tmp = _prepare_out(out, opts.overwrite)
    start = time.monotonic()
    try:
        src = resolve_model(str(model))
        hf_model, tokenizer = load(src, opts)
        report = run(hf_model, opts, tokenizer)
        qcfg = quantization_config(opts, report)
        cmd = command or opts.command(str(model), str(out))
        writer.write_checkpoint(tmp, hf_model, src, qcfg, writer.model_card(str(model), qcfg, cmd, report))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log_summary(report, time.monotonic() - start)
    return out


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """Fail early on OUT problems; return a fresh temporary folder next to OUT."""
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out} exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o777 & ~writer.umask())  # mkdtemp makes it private; OUT is an ordinary folder
        return tmp
    except OSError as e:
        raise ConvertError(f"cannot write {out}: {e.strerror or e}") from None


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():  # --overwrite: swap, then delete the old checkpoint
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def resolve_model(model: str) -> Path:
    """A local model folder, or a hub id downloaded (or found in the HF cache)."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConvertError(f"{path} has no config.json: not a Hugging Face model folder")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ConvertError(f"{path} has no weights (*.safetensors or *.bin)")
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ConvertError(f"model {model!r} not found: no such folder, and not a hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return resolve_model(snapshot_download(model, allow_patterns=writer.SOURCE_FILES))
    except ConvertError:
        raise
    except Exception as e:
        raise ConvertError(
            f"model {model!r} is not a local folder and could not be fetched from the Hugging Face "
            f"Hub ({type(e).__name__}); check the id and network access, or pass a local folder"
        ) from None


def load(src: Path, opts: Options):
    """Check the architecture and dimensions, then load the model on the CPU in its dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src)
    arch.check_supported(config)
    d = arch.dims(config)
    block = opts.rotation_block_size if opts.rotation == "block" else None
    arch.check_divisible(d, mxfp4.BLOCK, block, *opts.rotated)
    dtype = "auto" if opts.dtype == "auto" else getattr(torch, opts.dtype)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ConvertError(f"weight {name} contains NaN or Inf values")
    tokenizer = AutoTokenizer.from_pretrained(src) if opts.quantizer == "gptq" else None
    return model, tokenizer


def quantization_config(opts: Options, report: Report) -> dict:
    r1, r2, r4 = opts.rotated
    rotation = {"kind": fuse.KIND_NAMES[opts.rotation], "block_size": opts.rotation_block_size,
                "seed": opts.seed, "r1": r1, "r1_mode": "online" if opts.r1_online else "fused",
                "r2": r2, "r4": r4}
    quantizer = {"method": opts.quantizer}
    if opts.quantizer == "gptq":
        quantizer.update(block_size=128, damp=0.01, act_order=True, static_groups=True,
                         scale_search=opts.scale_search, calibration=report.calibration)
    return fmt.build_config(activation_format=opts.activations, rotation=rotation, quantizer=quantizer,
                            converter=f"vllm-brq {vllm_brq.__version__}", lm_head_format=opts.head_format)


def run(model: nn.Module, opts: Options, tokenizer=None, max_layers: int | None = None,
        ids: torch.Tensor | None = None) -> Report:
    """Fuse, rotate and quantize ``model`` in memory (CPU-resident between layers).

    ``max_layers`` stops after that many decoder layers (tests inspect a few layers);
    ``ids`` [nsamples, seqlen] replaces the calibration text (benchmarks)."""
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = arch.dims(model.config)
    rot = fuse.build_rotations(opts.rotation, d, opts.rotation_block_size, opts.seed, *opts.rotated,
                               r1_online=opts.r1_online)
    report = Report(untied_lm_head=fuse.transform_ends(model, rot))
    layers = model.model.layers[: max_layers or d.layers]
    hidden = kwargs = None
    if opts.quantizer == "gptq":
        source = "token ids"
        if ids is None:
            text, source = calibration.load_text(opts.calib, opts.calib_file)
            ids = calibration.token_windows(tokenizer, text, opts.nsamples, opts.seqlen)
        report.calibration = {"source": source, "nsamples": ids.shape[0], "seqlen": ids.shape[1]}
        hidden, kwargs = capture_inputs(model, ids, device)
    act = opts.activations == "mxfp4"
    for i, layer in enumerate(tqdm(layers, desc="layers", unit="layer")):
        t0 = time.monotonic()
        layer.to(device)
        fuse.transform_layer(layer, rot, d)
        for names, r in ((fuse.R1_READERS, rot.r1_online), (("mlp.down_proj",), rot.r4)):
            for name in names if r is not None else ():  # online rotations: the served input is x R
                lin = arch.sub(layer, name)
                arch.set_sub(layer, name, ReferenceLinear(weight=lin.weight.data, bias=_data(lin.bias),
                                                          input_rotation=r.float(), quantize_activations=False))
        if opts.quantizer == "gptq":
            hidden = quantize_layer_gptq(layer, i, hidden, kwargs, act, opts.scale_search, report)
        elif opts.quantizer == "rtn":
            quantize_layer_rtn(layer, i, act, report)
        layer.to("cpu")
        report.layer_seconds.append(time.monotonic() - t0)
    if opts.head_format == "fp8":  # GPTQ needs the last layer's outputs: all layers done
        gptq = head_hessian(model, hidden) if hidden is not None and len(layers) == d.layers else None
        quantize_head_fp8(model, report, gptq)
    return report


def _data(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.data


class _Stop(Exception):
    """Raised by a hook once the inputs it waits for are captured (skips the rest)."""


@torch.no_grad()
def capture_inputs(model: nn.Module, ids: torch.Tensor, device: torch.device):
    """Hidden states entering decoder layer 0 for every window [n, seqlen, d] (on device),
    and the keyword arguments (rotary embeddings, mask) the layers are called with."""
    inner = model.model
    for m in (inner.embed_tokens, inner.rotary_emb):
        m.to(device)
    seen = {}

    def hook(_mod, args, kwargs):
        seen["x"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = kwargs
        raise _Stop

    def first_layer_input(batch: torch.Tensor) -> torch.Tensor:
        try:
            inner(input_ids=batch.to(device), use_cache=False)
        except _Stop:
            return seen["x"]
        raise RuntimeError("decoder layer 0 was never called")

    handle = inner.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        first_layer_input(ids[:1])  # batch-1 kwargs broadcast over any chunk size
        kwargs = seen["kwargs"]
        hidden = torch.cat([first_layer_input(b) for b in ids.split(_chunk_samples(ids.shape[1]))])
    finally:
        handle.remove()
        inner.embed_tokens.to("cpu")
    return hidden, kwargs


def _chunk_samples(seqlen: int) -> int:
    return max(1, CHUNK_TOKENS // seqlen)


def _forward(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    y = layer(x, **kwargs)
    return y[0] if isinstance(y, tuple) else y


def _collect(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, modules: list[nn.Module], gptq: GPTQ) -> None:
    """Run the layer on every chunk until all ``modules`` (which share one input) have
    been reached; add their (rotated) input to the Hessian once per chunk."""
    seen: set[int] = set()

    def hook(mod, args):
        if not seen:
            x = args[0]
            r = getattr(mod, "input_rotation", None)
            gptq.add_batch(rotate(x.float(), r.float()) if r is not None else x)
        seen.add(id(mod))
        if len(seen) == len(modules):
            raise _Stop

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        for x in hidden.split(_chunk_samples(hidden.shape[1])):
            seen.clear()
            try:
                _forward(layer, x, kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


def _packed_linear(lin: nn.Module, q: torch.Tensor, act: bool) -> ReferenceLinear:
    packed, scales = mxfp4.quantize(q)
    return ReferenceLinear(weight_packed=packed, weight_scale=scales,
                           input_rotation=getattr(lin, "input_rotation", None),
                           bias=_data(lin.bias), quantize_activations=act)


def _rel(num: torch.Tensor, den: torch.Tensor) -> float:
    return math.sqrt(float(num.sum()) / max(float(den.sum()), 1e-30))


@torch.no_grad()
def head_hessian(model: nn.Module, hidden: torch.Tensor) -> GPTQ:
    """The lm_head's GPTQ, its Hessian from the final norm of the quantized model's last hidden states."""
    norm = model.model.norm.to(hidden.device)
    gptq = GPTQ(hidden.shape[-1], hidden.device, grid="fp8_rows")
    for x in hidden.split(_chunk_samples(hidden.shape[1])):
        gptq.add_batch(norm(x))
    norm.to("cpu")
    return gptq


@torch.no_grad()
def quantize_head_fp8(model: nn.Module, report: Report, gptq: GPTQ | None = None) -> None:
    """lm_head -> e4m3 with a float32 scale per row (format version 2), by GPTQ when given its
    Hessian, else round to nearest. A tied head is untied: the embedding stays in the source dtype."""
    w = model.lm_head.weight.detach().float()
    if gptq is None:
        q, s = fp8_head_weights_reference(w)
    else:  # GPTQ keeps the row scales fixed, so the values it returns are codes * s exactly
        s = fp8_row_scales(w)
        q = (gptq.quantize(w).cpu() / s).to(torch.float8_e4m3fn)
        s = s.reshape(-1)
        err, ref = gptq.output_sq_error(w, q.float() * s[:, None])
        report.head_output_error = _rel(err, ref)
    report.head_weight_error = _rel((w - q.float() * s[:, None]) ** 2, w ** 2)
    model.lm_head = Fp8Head(q, s)
    model.config.tie_word_embeddings = False
    log.info("lm_head -> FP8 e4m3 by %s (relative weight error %.4f%s)", "GPTQ" if gptq else "RTN",
             report.head_weight_error, "" if gptq is None else f", output error {report.head_output_error:.4f}")


@torch.no_grad()
def quantize_layer_rtn(layer: nn.Module, index: int, act: bool, report: Report) -> None:
    for name in arch.LINEARS:
        lin = arch.sub(layer, name)
        w = lin.weight.float()
        q = mxfp4.fake_quantize(w)
        err = _rel((w - q) ** 2, w ** 2)
        report.stats.append(LinearStats(f"layers.{index}.{name}", err, err))
        arch.set_sub(layer, name, _packed_linear(lin, q, act))


@torch.no_grad()
def quantize_layer_gptq(layer: nn.Module, index: int, hidden: torch.Tensor, kwargs: dict,
                        act: bool, scale_search: bool, report: Report) -> torch.Tensor:
    """GPTQ every group of one layer in order; return the quantized layer's outputs."""
    for group in arch.GROUPS:
        lins = [arch.sub(layer, name) for name in group]
        gptq = GPTQ(lins[0].weight.shape[1], hidden.device, scale_search=scale_search)
        _collect(layer, hidden, kwargs, lins, gptq)
        w = torch.cat([lin.weight.float() for lin in lins])
        q = gptq.quantize(w)
        rtn = mxfp4.fake_quantize(w)
        err_q, ref = gptq.output_sq_error(w, q)
        err_rtn, _ = gptq.output_sq_error(w, rtn)
        row = 0
        for name, lin in zip(group, lins):
            rows = slice(row, row + lin.weight.shape[0])
            row = rows.stop
            wr = w[rows]
            report.stats.append(LinearStats(
                f"layers.{index}.{name}",
                weight_rtn=_rel((wr - rtn[rows]) ** 2, wr ** 2), weight_q=_rel((wr - q[rows]) ** 2, wr ** 2),
                output_rtn=_rel(err_rtn[rows], ref[rows]), output_q=_rel(err_q[rows], ref[rows])))
            arch.set_sub(layer, name, _packed_linear(lin, q[rows], act))
    return torch.cat([_forward(layer, x, kwargs) for x in hidden.split(_chunk_samples(hidden.shape[1]))])


def summary_lines(report: Report, with_time: bool = True) -> list[str]:
    """Per layer: mean relative weight and output errors, RTN vs the chosen quantizer
    (and seconds; the model card leaves time out so checkpoints stay byte-identical)."""
    lines = ["layer  weight_err(rtn -> q)  output_err(rtn -> q)" + ("  seconds" if with_time else "")]
    by_layer: dict[int, list[LinearStats]] = {}
    for s in report.stats:
        by_layer.setdefault(int(s.name.split(".")[1]), []).append(s)
    for i, secs in enumerate(report.layer_seconds):
        st = by_layer.get(i, [])
        if not st:
            lines.append(f"{i:5d}  {'-':>20}  {'-':>20}" + (f"  {secs:7.1f}" if with_time else ""))
            continue
        mean = lambda key: sum(getattr(s, key) for s in st) / len(st)  # noqa: E731
        out = (f"{mean('output_rtn'):.4f} -> {mean('output_q'):.4f}"
               if st[0].output_q is not None else "-")
        lines.append(f"{i:5d}  {mean('weight_rtn'):.4f} -> {mean('weight_q'):.4f}  {out:>20}"
                     + (f"  {secs:7.1f}" if with_time else ""))
    return lines


def log_summary(report: Report, seconds: float) -> None:
    for line in summary_lines(report):
        log.info("%s", line)
    log.info("converted in %.1f s", seconds)

