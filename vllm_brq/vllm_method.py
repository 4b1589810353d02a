"""The vLLM quantization method "brq": config, linear methods and checked weight loading.

vLLM builds each decoder linear (fused q/k/v and gate/up included) with the method that
``BRQQuantConfig.get_quant_method`` returns, streams the checkpoint through the parameter
loaders declared in ``create_weights`` and calls ``process_weights_after_loading`` before
serving. Every problem with a checkpoint is raised as ``format.FormatError`` naming the
checkpoint key or tensor, at config time (format_version, activation_format, block size)
or at load time (missing, misshapen or inconsistent tensors), never at the first request.

Two linear methods, and one for the lm_head:
- ``BRQLinearMethod``: MXFP4 weights (``weight_packed`` + ``weight_scale``), forward
  through the ``brq::mxfp4_linear`` op (kernels.dispatch picks the backend).
- ``BRQDenseLinearMethod``: ``--quantizer none`` checkpoints (rotated ``weight`` in the
  source dtype), forward through ``brq::rotated_linear``.
Both accept an optional ``input_rotation`` ([b, b] shared or [in/b, b, b] per block;
row-parallel shards take their slice of the per-block form).
- ``BRQFp8HeadMethod``: ``lm_head_format: fp8`` (format version 2): the ParallelLMHead's e4m3
  ``weight`` and float32 row ``weight_scale``, forward through ``brq::fp8_linear``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.nn import Parameter
from vllm.config import get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)

from vllm_brq import format as fmt
from vllm_brq import fusion, ops
from vllm_brq.kernels import dispatch

logger = init_logger(__name__)

WEIGHT = "weight"
QKV_SHARDS = ("q", "k", "v")
# linears whose input is the RMSNorm output: with R1 online (format.py) they carry input_rotation
R1_ONLINE_LINEARS = ("qkv_proj", "gate_up_proj", *fmt.R1_ONLINE_LINEARS)


def check_block_size(cfg: fmt.BRQConfig) -> None:
    """The rotation block must be a power of two (Hadamard blocks); kernels choose among them."""
    block = cfg.rotation["block_size"]
    if cfg.rotation["kind"] != "global_hadamard" and (block < 2 or block & (block - 1)):
        raise fmt.FormatError(
            f"quantization_config.rotation.block_size = {block} is not supported; "
            "block rotations need a power of two (32 is the MXFP4 block)"
        )


class BRQQuantConfig(QuantizationConfig):
    """``quant_method: brq`` checkpoints (format in vllm_brq.format)."""

    def __init__(self, brq: fmt.BRQConfig):
        super().__init__()
        self.brq = brq

    def __repr__(self) -> str:
        return (f"BRQQuantConfig(activation_format={self.brq.activation_format!r}, "
                f"quantizer={self.brq.quantizer.get('method')!r}, rotation={self.brq.rotation})")

    @classmethod
    def get_name(cls) -> str:
        return fmt.QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # The torch reference runs on any device; faster backends are chosen at dispatch.
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BRQQuantConfig:
        brq = fmt.parse_config(config)
        check_block_size(brq)
        return cls(brq)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        """Claim ``quant_method: brq`` checkpoints so plain ``vllm serve OUT`` works, and
        validate their config here: this runs in the front-end process before any engine
        starts, so a bad key fails fast with its name."""
        if hf_quant_cfg.get("quant_method") != fmt.QUANT_METHOD or user_quant not in (None, fmt.QUANT_METHOD):
            return None
        cls.from_config(hf_quant_cfg)
        return fmt.QUANT_METHOD

    def is_ignored(self, prefix: str) -> bool:
        """Whether the layer at ``prefix`` stays unquantized (``ignore``; fused layers
        are ignored only if all their checkpoint shards are)."""
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf, [leaf])
        names = [f"{parent}.{s}" if parent else s for s in shards]
        hits = [any(n == i or n.endswith("." + i) for i in self.brq.ignore) for n in names]
        if any(hits) and not all(hits):
            raise fmt.FormatError(
                f"quantization_config.ignore lists only some of {names}, which vLLM fuses into one layer"
            )
        return all(hits)

    def expects_rotation(self, prefix: str) -> bool:
        """Whether the checkpoint must hold ``input_rotation`` for this layer: R4 on
        down_proj, R1 online (``r1_mode`` "online") on q/k/v and gate/up, or every linear with
        the outlier-aware rotation. A silently absent rotation would serve wrong numbers, so
        its absence is an error."""
        rot = self.brq.rotation
        if rot["kind"] == "outlier_aware":
            return True
        if rot["kind"] == "none":
            return False
        r1_online = bool(rot.get("r1")) and rot.get("r1_mode") == "online"
        return ((bool(rot.get("r4")) and prefix.endswith("down_proj"))
                or (r1_online and prefix.rpartition(".")[2] in R1_ONLINE_LINEARS))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):
            return BRQFp8HeadMethod(prefix) if self.brq.lm_head_format == "fp8" else None
        if not isinstance(layer, LinearBase):
            return None  # embeddings, attention: unquantized
        if self.is_ignored(prefix):
            return UnquantizedLinearMethod()
        if self.brq.weights_quantized:
            # before vLLM builds its compile backend (after the model's layers): the pass that
            # fuses each RMSNorm into the brq linear after it (vllm_brq/fusion.py)
            fusion.install(get_current_vllm_config_or_none())
            return BRQLinearMethod(self, prefix)
        return BRQDenseLinearMethod(self, prefix)


def _shard_ids(layer: torch.nn.Module, output_partition_sizes: list[int]) -> tuple:
    """The shard ids vLLM passes when loading each checkpoint tensor of this layer."""
    if len(output_partition_sizes) == 1:
        return (None,)
    if hasattr(layer, "total_num_kv_heads"):  # QKVParallelLinear
        return QKV_SHARDS
    return tuple(range(len(output_partition_sizes)))


def _checkpoint_out_features(layer: torch.nn.Module, shard_id) -> int | None:
    """Rows of the (unsharded) checkpoint tensor for one shard; None if not knowable."""
    if shard_id in QKV_SHARDS:
        heads = layer.total_num_heads if shard_id == "q" else layer.total_num_kv_heads
        size = getattr(layer, "v_head_size", layer.head_size) if shard_id == "v" else layer.head_size
        return heads * size
    if isinstance(shard_id, int):
        return layer.output_sizes[shard_id]
    if len(getattr(layer, "output_sizes", [None])) > 1:
        return None  # fused on disk: vLLM splits it itself
    return layer.output_size


class _BRQMethodBase(LinearMethodBase):
    """Checked loading shared by both linear methods.

    Every checkpoint tensor goes through ``_checked_loader``: it validates dtype and shape
    against the unsharded layer (naming the checkpoint tensor), then delegates to vLLM's
    own (TP-aware) loader and records the shard. After loading, a tensor never seen is
    reported as missing: vLLM itself only checks completeness for unquantized models.
    """

    def __init__(self, config: BRQQuantConfig, prefix: str):
        self.config = config
        self.prefix = prefix

    # ---- naming -------------------------------------------------------------------
    def tensor_name(self, key: str, shard_id=None) -> str:
        """The checkpoint name of a tensor (q_proj rather than the fused qkv_proj)."""
        if shard_id is None:
            return f"{self.prefix}.{key}"
        parent, _, leaf = self.prefix.rpartition(".")
        shards = self.config.packed_modules_mapping.get(leaf)
        index = QKV_SHARDS.index(shard_id) if shard_id in QKV_SHARDS else shard_id
        name = shards[index] if shards and index < len(shards) else f"{leaf}[{shard_id}]"
        return f"{parent}.{name}.{key}"

    # ---- weights ------------------------------------------------------------------
    def _init_layer(self, layer, input_size_per_partition, output_partition_sizes, input_size):
        layer.brq_loaded = set()
        layer.brq_shards = _shard_ids(layer, output_partition_sizes)
        layer.brq_input_size = input_size
        layer.brq_input_size_per_partition = input_size_per_partition
        layer.brq_output_size_per_partition = sum(output_partition_sizes)
        # float32 like the checkpoint (vLLM builds layers under a bf16 default dtype, which
        # would flag the float32 tensor as a lossy load)
        rotation = BasevLLMParameter(data=torch.empty(0, dtype=torch.float32),
                                     weight_loader=self._rotation_loader(layer))
        layer.register_parameter(fmt.INPUT_ROTATION, rotation)

    def _checked_loader(self, layer, key: str, expected: Callable[[int, int], tuple], dtype_ok: Callable,
                        delegate: Callable) -> Callable:
        def load(param, loaded_weight, *shard):
            shard_id = shard[0] if shard else None
            name = self.tensor_name(key, shard_id)
            if not dtype_ok(loaded_weight.dtype):
                raise fmt.FormatError(f"tensor {name} has dtype {loaded_weight.dtype}, which {key} cannot have")
            out = _checkpoint_out_features(layer, shard_id)
            want = expected(out if out is not None else loaded_weight.shape[0], layer.brq_input_size)
            if tuple(loaded_weight.shape) != want:
                raise fmt.FormatError(f"tensor {name} has shape {list(loaded_weight.shape)}, expected {list(want)}")
            delegate(param, loaded_weight, *shard)
            layer.brq_loaded.add((key, shard_id))
        return load

    def _rotation_loader(self, layer) -> Callable:
        """Load ``input_rotation``: [b, b] replicated; [in/b, b, b] sliced to this rank's
        input shard on row-parallel layers; fused layers must carry identical copies."""
        def load(param, r: torch.Tensor, *shard):
            shard_id = shard[0] if shard else None
            name = self.tensor_name(fmt.INPUT_ROTATION, shard_id)
            b = fmt.check_rotation_shape(name.rpartition(".")[0], tuple(r.shape), layer.brq_input_size)
            self._check_rotation_block(name, b, tuple(r.shape), layer)
            local = layer.brq_input_size_per_partition
            if local != layer.brq_input_size and r.dim() == 3:  # row-parallel shard
                n = local // b
                r = r.narrow(0, param.tp_rank * n, n)
            r = r.to(device=param.device, dtype=torch.float32).contiguous()
            if param.numel() and not torch.equal(param.data, r):
                raise fmt.FormatError(
                    f"tensors {layer.brq_rotation_name} and {name} differ; linears that vLLM fuses "
                    f"(into {self.prefix}) must carry identical input_rotation copies"
                )
            param.data = r
            layer.brq_rotation_name = name
            layer.brq_loaded.add((fmt.INPUT_ROTATION, shard_id))
        return load

    def _check_rotation_block(self, name: str, b: int, shape: tuple, layer) -> None:
        local = layer.brq_input_size_per_partition
        if b == layer.brq_input_size and len(shape) == 2:  # dense (global) rotation
            if local != layer.brq_input_size:
                raise fmt.FormatError(
                    f"tensor {name} is a dense {b}x{b} rotation; a tensor-parallel shard of "
                    f"{local} inputs cannot apply it locally (use block rotations with TP > 1)"
                )
            return
        want = self.config.brq.rotation["block_size"]
        if b != want:
            raise fmt.FormatError(
                f"tensor {name} has {b}x{b} blocks but quantization_config.rotation.block_size is {want}"
            )
        if local % b:
            raise fmt.FormatError(
                f"tensor {name}: the tensor-parallel shard of {local} inputs is not a multiple of "
                f"the rotation block {b}"
            )

    # ---- after loading ------------------------------------------------------------
    def _check_complete(self, layer, keys: tuple[str, ...]) -> None:
        loaded = layer.brq_loaded
        for key in keys:
            if (key, None) in loaded:
                continue  # fused on disk
            for shard_id in layer.brq_shards:
                if (key, shard_id) not in loaded:
                    raise fmt.FormatError(f"checkpoint is missing tensor {self.tensor_name(key, shard_id)}")
        rotations = {s for k, s in loaded if k == fmt.INPUT_ROTATION}
        if not rotations and self.config.expects_rotation(self.prefix):
            raise fmt.FormatError(
                f"checkpoint is missing tensor {self.tensor_name(fmt.INPUT_ROTATION, layer.brq_shards[0])} "
                f"(quantization_config.rotation = {self.config.brq.rotation} puts one on this linear)"
            )
        if rotations and None not in rotations and rotations != set(layer.brq_shards):
            missing = [self.tensor_name(fmt.INPUT_ROTATION, s) for s in layer.brq_shards if s not in rotations]
            raise fmt.FormatError(
                f"checkpoint is missing tensor {missing[0]}; fused linears must all carry input_rotation"
            )

    def _finish_rotation(self, layer) -> None:
        """Drop an absent rotation; keep a loaded one as a plain float32 tensor."""
        r = layer.input_rotation
        del layer.input_rotation
        layer.register_parameter(
            fmt.INPUT_ROTATION, Parameter(r.data, requires_grad=False) if r.numel() else None
        )
        del layer.brq_loaded


def _is_uint8(dtype: torch.dtype) -> bool:
    return dtype == torch.uint8


@register_weight_loader_v2_supported_method
class BRQLinearMethod(_BRQMethodBase):
    """MXFP4 weights: y = Q(x R) W^T + b through ``brq::mxfp4_linear``."""

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        if input_size_per_partition % fmt.GROUP_SIZE:
            tp = input_size // input_size_per_partition
            raise fmt.FormatError(
                f"{self.prefix}: the tensor-parallel shard of its input dimension ({input_size} / TP {tp} = "
                f"{input_size_per_partition}) is not a multiple of the MXFP4 block {fmt.GROUP_SIZE}; "
                "use a smaller --tensor-parallel-size"
            )
        loader = extra_weight_attrs.pop("weight_loader")
        self._init_layer(layer, input_size_per_partition, output_partition_sizes, input_size)
        rows = sum(output_partition_sizes)
        specs = fmt.linear_tensor_specs(rows, input_size_per_partition)

        def shape_of(key):
            return lambda out, inp: fmt.linear_tensor_specs(out, inp)[key][0]

        packed = PackedvLLMParameter(
            data=torch.empty(specs[fmt.WEIGHT_PACKED][0], dtype=torch.uint8),
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=2,
            weight_loader=self._checked_loader(layer, fmt.WEIGHT_PACKED, shape_of(fmt.WEIGHT_PACKED),
                                               _is_uint8, loader),
        )
        scale = GroupQuantScaleParameter(
            data=torch.empty(specs[fmt.WEIGHT_SCALE][0], dtype=torch.uint8),
            input_dim=1, output_dim=0,
            weight_loader=self._checked_loader(layer, fmt.WEIGHT_SCALE, shape_of(fmt.WEIGHT_SCALE),
                                               _is_uint8, loader),
        )
        layer.register_parameter(fmt.WEIGHT_PACKED, packed)
        layer.register_parameter(fmt.WEIGHT_SCALE, scale)

    def process_weights_after_loading(self, layer) -> None:
        self._check_complete(layer, (fmt.WEIGHT_PACKED, fmt.WEIGHT_SCALE))
        if torch.any(layer.weight_scale.data == 255):
            raise fmt.FormatError(f"tensor {self.prefix}.weight_scale holds E8M0 code 255 (NaN)")
        self._finish_rotation(layer)
        packed, scale = dispatch.prepare_weights(layer.weight_packed.data, layer.weight_scale.data)
        del layer.weight_packed, layer.weight_scale
        layer.weight_packed = Parameter(packed, requires_grad=False)
        layer.weight_scale = Parameter(scale, requires_grad=False)
        # CUDA fast-path tensors (FP8 weight copy, +-1 rotation, Marlin for W4A16); none on CPU
        rot = layer.input_rotation.data if layer.input_rotation is not None else None
        extras = dispatch.prepare_extras(packed, scale, rot, self.prefix, self.config.brq.quantize_activations,
                                         getattr(layer, "bias", None))
        for key in dispatch.EXTRA_KEYS:
            setattr(layer, key, Parameter(extras[key], requires_grad=False) if key in extras else None)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.mxfp4_linear(x, layer.weight_packed, layer.weight_scale, layer.input_rotation, bias,
                                self.config.brq.quantize_activations,
                                *[getattr(layer, key, None) for key in dispatch.EXTRA_KEYS])


@register_weight_loader_v2_supported_method
class BRQDenseLinearMethod(_BRQMethodBase):
    """``--quantizer none``: rotated dense ``weight``; y = [Q](x R) W^T + b."""

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        loader = extra_weight_attrs.pop("weight_loader")
        self._init_layer(layer, input_size_per_partition, output_partition_sizes, input_size)
        weight = ModelWeightParameter(
            data=torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            input_dim=1, output_dim=0,
            weight_loader=self._checked_loader(layer, WEIGHT, lambda out, inp: (out, inp),
                                               lambda d: d.is_floating_point, loader),
        )
        layer.register_parameter(WEIGHT, weight)

    def process_weights_after_loading(self, layer) -> None:
        self._check_complete(layer, (WEIGHT,))
        self._finish_rotation(layer)
        weight = layer.weight.data
        del layer.weight
        layer.weight = Parameter(weight, requires_grad=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.rotated_linear(x, layer.weight, layer.input_rotation, bias,
                                  self.config.brq.quantize_activations)


class BRQFp8HeadMethod(QuantizeMethodBase):
    """The FP8 lm_head: y = (q_hi s_hi + q_lo s_lo)(W8 s_w)^T through ``brq::fp8_linear``. Its tensors go
    through the ParallelLMHead's own loader (vocabulary shards and padding rows, which get
    weight and scale 0), after a check of dtype and unsharded shape that names the tensor."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        loader = extra_weight_attrs.pop("weight_loader")
        layer.brq_loaded = set()
        rows = sum(output_partition_sizes)
        for key, (shape, dtype) in fmt.fp8_head_tensor_specs(layer.org_vocab_size, input_size).items():
            param = Parameter(torch.zeros(rows, *shape[1:], dtype=getattr(torch, dtype)), requires_grad=False)
            param.output_dim = 0
            param.weight_loader = self._checked_loader(layer, key, shape, dtype, loader)
            layer.register_parameter(key, param)

    def _checked_loader(self, layer, key: str, shape: tuple, dtype: str, delegate: Callable) -> Callable:
        def load(param, loaded_weight):
            fmt.check_tensors(self.prefix, {key: loaded_weight}, {key: (shape, dtype)})
            delegate(param, loaded_weight)
            layer.brq_loaded.add(key)
        return load

    def process_weights_after_loading(self, layer) -> None:
        for key in fmt.fp8_head_tensor_specs(0, 0):
            if key not in layer.brq_loaded:
                raise fmt.FormatError(f"checkpoint is missing tensor {self.prefix}.{key}")
        if not bool(torch.isfinite(layer.weight_scale).all()):
            raise fmt.FormatError(f"tensor {self.prefix}.weight_scale holds NaN or Inf")
        del layer.brq_loaded
        if layer.weight.device.type == "cpu":  # the torch reference would widen the whole head on every
            # call (SmolLM2 on 2 cores: 123 ms a token against 20); float32 holds the e4m3 values exactly
            layer.weight = Parameter(layer.weight.data.float(), requires_grad=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.fp8_linear(x, layer.weight, layer.weight_scale, bias)

    def tie_weights(self, layer, embed_tokens):
        raise fmt.FormatError("an FP8 lm_head (lm_head_format fp8) cannot be tied to the embedding; "
                              "config.json must set tie_word_embeddings to false")
