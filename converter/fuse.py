"""RMSNorm fusion and rotation folding: the exact (unquantized) part of the conversion.

R1 has two placements (``--r1-mode``):
- fused: RMSNorm commutes with an orthogonal R only when its weight is all ones, so each
  norm weight g is first folded into the linears that read it (W <- W diag(g)) and set to
  1. Then embed <- E R1; q,k,v,gate,up <- W R1; o,down <- R1^T W (and their biases b R1);
  lm_head <- W R1. The residual stream then carries x R1 everywhere.
- online: the norms keep their gains and the residual stream is not rotated; q,k,v,gate,up
  <- W R1 and their input is rotated online (``input_rotation``), as R4's. R1 is one shared
  32-block randomized Hadamard diag(s) H: s is folded into both norm weights (g <- g s, a
  sign flip, exact), so the stored online rotation is the plain H. Why: folding g (max/median
  gain up to 14x on SmolLM2) into the weights makes their MXFP4 grid much coarser
  (benchmarks/norm_fusion_ablation.py); kept in the norm, it scales the activation instead,
  whose block scales follow it.
Then, with x -> x R applied per block:
- R2 (per head): v <- R2^T W (rows of each head, and the v bias), o <- W R2 (columns of
  each head). One R2 for all heads, as grouped-query attention shares v heads.
- R4 (MLP intermediate): down <- W R4 offline; the online x R4 is ``input_rotation``. A
  randomized Hadamard R4 = diag(s) H has its signs folded into up_proj's rows: the MLP
  computes x = act(gate) * up, so up <- diag(s) W makes x diag(s) exactly, and the stored
  online rotation is the plain Sylvester H (the GPU kernels' Hadamard transform then skips
  its sign pass). The product x R4 is unchanged, bit for bit.
All arithmetic is float64, rounded once to the source dtype, so --quantizer none
reproduces the original model up to that rounding.

Tied embeddings: the final norm weight must go into lm_head, which then differs from the
embedding. When that weight is not all ones, lm_head is untied (written as its own tensor,
``tie_word_embeddings: false``); otherwise embeddings stay tied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm_brq.rotation import hadamard, make_rotation, rotate, rotate_weight_input, rotate_weight_output

from .architectures import Dims, sub

KIND_NAMES = {"block": "block_hadamard", "global": "global_hadamard", "none": "none"}
NORM_READERS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
R1_READERS = tuple(name for _, readers in NORM_READERS for name in readers)  # online R1's linears


@dataclass
class Rotations:
    """The compact rotations of one conversion (None where disabled)."""

    r1: torch.Tensor | None
    r2: torch.Tensor | None
    r4: torch.Tensor | None  # the online R4 (the checkpoint's down_proj input_rotation)
    r4_signs: torch.Tensor | None = None  # s folded into up_proj's rows; R4 as drawn = diag(s) r4
    r1_online: torch.Tensor | None = None  # --r1-mode online: q/k/v/gate/up's input_rotation (r1 is None)
    r1_signs: torch.Tensor | None = None  # s folded into the norm weights; R1 as drawn = diag(s) r1_online

    @property
    def fuse_norms(self) -> bool:
        """Norm gains go into the weights unless R1 is applied online (then they must stay)."""
        return self.r1_online is None

    def r4_drawn(self) -> torch.Tensor:
        """The R4 the weight side of down_proj is rotated by."""
        return _drawn(self.r4, self.r4_signs)

    def r1_drawn(self) -> torch.Tensor:
        """The online R1 the weight side of q/k/v/gate/up is rotated by."""
        return _drawn(self.r1_online, self.r1_signs)


def _drawn(plain: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    return plain if signs is None else signs[:, None] * plain


def split_signs(r: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """r = diag(s) H (randomized Hadamard, [n, n]) -> (s, H); anything else -> (None, r)."""
    n = r.shape[0]
    if r.dim() != 2 or n & (n - 1):  # Sylvester sizes only (a Haar-random R is not diag(s) H)
        return None, r
    s = torch.sign(r[:, 0])
    plain = s[:, None] * r
    if not torch.equal(plain, hadamard(n, r.dtype)):
        return None, r
    return s, plain


def build_rotations(kind: str, d: Dims, block: int, seed: int, r1: bool, r2: bool, r4: bool,
                    r1_online: bool = False) -> Rotations:
    """Folded rotations (R1 fused, R2) have one block per position; an online one (R4, R1
    online) is one shared [b, b] matrix whose random signs are folded into the weights or
    norms before it. One R of each kind serves every layer."""
    k = KIND_NAMES[kind]
    r4_signs, r4_plain = _online(k, d.intermediate, block, seed, "r4") if r4 else (None, None)
    r1_signs, r1_plain = _online(k, d.hidden, block, seed, "r1") if r1 and r1_online else (None, None)
    return Rotations(
        r1=make_rotation(k, d.hidden, block, seed, "r1") if r1 and not r1_online else None,
        r2=make_rotation(k, d.head_dim, block, seed, "r2") if r2 else None,
        r4=r4_plain,
        r4_signs=r4_signs,
        r1_online=r1_plain,
        r1_signs=r1_signs,
    )


def _online(kind: str, dim: int, block: int, seed: int, stream: str):
    """(signs, plain) of an online rotation, or (None, None) for kind none."""
    drawn = make_rotation(kind, dim, block, seed, stream, shared=True)
    return (None, None) if drawn is None else split_signs(drawn)


def per_head(r: torch.Tensor, head_dim: int, heads: int) -> torch.Tensor:
    """Tile a head_dim rotation over ``heads`` consecutive heads, in compact form."""
    if r.dim() == 2 and r.shape[0] == head_dim:  # dense over the head
        return r.unsqueeze(0).expand(heads, head_dim, head_dim)
    return r.repeat(heads, 1, 1) if r.dim() == 3 else r


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


@torch.no_grad()
def transform_layer(layer: nn.Module, rot: Rotations, d: Dims) -> None:
    """Fuse both norms of one decoder layer (or, R1 online, fold R1's signs into them) and fold
    R1/R2/R4 (weight side) into its linears."""
    for norm_name, readers in NORM_READERS:
        norm = sub(layer, norm_name)
        g = norm.weight.double()
        for name in readers:
            lin = sub(layer, name)
            if rot.r1_online is not None:
                _set(lin.weight, rotate_weight_input(lin.weight.double(), rot.r1_drawn()))
                continue
            w = lin.weight.double() * g
            _set(lin.weight, rotate_weight_input(w, rot.r1) if rot.r1 is not None else w)
        if rot.r1_online is None:
            norm.weight.data.fill_(1)
        elif rot.r1_signs is not None:
            _set(norm.weight, g * rot.r1_signs.repeat(g.numel() // rot.r1_signs.numel()).to(g.device, torch.float64))
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        lin = sub(layer, name)
        w = lin.weight.double()
        if name == "self_attn.o_proj" and rot.r2 is not None:
            w = rotate_weight_input(w, per_head(rot.r2, d.head_dim, d.heads))
        if name == "mlp.down_proj" and rot.r4 is not None:
            w = rotate_weight_input(w, rot.r4_drawn())
        if rot.r1 is not None:
            w = rotate_weight_output(w, rot.r1)
            if lin.bias is not None:
                _set(lin.bias, rotate(lin.bias.double(), rot.r1))
        _set(lin.weight, w)
    if rot.r4_signs is not None:  # x = act(gate) * up: flipping up's rows flips x exactly
        up = sub(layer, "mlp.up_proj")
        s = rot.r4_signs.repeat(d.intermediate // rot.r4_signs.numel()).to(up.weight.device, torch.float64)
        _set(up.weight, up.weight.double() * s[:, None])
        if up.bias is not None:
            _set(up.bias, up.bias.double() * s)
    if rot.r2 is not None:
        v = sub(layer, "self_attn.v_proj")
        r2 = per_head(rot.r2, d.head_dim, d.kv_heads)
        _set(v.weight, rotate_weight_output(v.weight.double(), r2))
        if v.bias is not None:
            _set(v.bias, rotate(v.bias.double(), r2))


@torch.no_grad()
def transform_ends(model: nn.Module, rot: Rotations) -> bool:
    """Embedding and lm_head (with the final norm fused, unless R1 is online: then nothing
    needs it and both stay as they are). Returns whether lm_head was untied from the embedding."""
    if not rot.fuse_norms:
        return False
    emb = model.model.embed_tokens.weight
    head = model.lm_head.weight
    norm = model.model.norm
    tied = head is emb or head.data_ptr() == emb.data_ptr()
    g = norm.weight.double()
    untie = tied and not bool(torch.all(norm.weight == 1))
    h = head.double() * g
    if rot.r1 is not None:
        h = rotate_weight_input(h, rot.r1)
        _set(emb, rotate(emb.double(), rot.r1))
    if untie or not tied:
        model.lm_head.weight = nn.Parameter(h.to(head.dtype).contiguous(), requires_grad=False)
        model.config.tie_word_embeddings = False
    norm.weight.data.fill_(1)
    return untie
