"""Rotations: how they are built, stored and applied (x -> x @ R).

A rotation of a dimension ``dim`` is stored compactly as either
- ``[b, b]``: one block shared by every b-block of the dimension,
- ``[dim/b, b, b]``: one block per b-block (block-diagonal, the BRQ rotation), or
- ``[dim, dim]``: a dense rotation (the global QuaRot-style baseline, b = dim).

Block rotations are randomized Hadamards R_i = diag(D_i) H_b (signs first, then the
Hadamard; H_b D_i would only flip output signs and quantize exactly like plain H_b).
Everything is derived from ``(seed, stream)`` so the same options give the same bytes.
"""

from __future__ import annotations

import zlib

import torch

KINDS = ("block_hadamard", "global_hadamard", "none")


def _generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator that depends only on the seed and a stream name (e.g. 'r2.layer3')."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(stream.encode())) % 2**62)


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix of size n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype)


def random_signs(n: int, seed: int, stream: str) -> torch.Tensor:
    """n random +-1 (float64), reproducible from (seed, stream)."""
    bits = torch.randint(0, 2, (n,), generator=_generator(seed, stream))
    return (1 - 2 * bits).to(torch.float64)


def block_rotation(dim: int, block: int, seed: int, stream: str, shared: bool = False) -> torch.Tensor:
    """Block-diagonal randomized Hadamard [dim/block, block, block] (float64), or with
    ``shared`` one block [block, block] used for every block (cheapest online: one 32x32
    matrix for a kernel to hold)."""
    if dim % block:
        raise ValueError(f"dimension {dim} is not divisible by the rotation block size {block}")
    if shared:
        return random_signs(block, seed, stream).unsqueeze(1) * hadamard(block)
    d = random_signs(dim, seed, stream).view(dim // block, block, 1)
    return d * hadamard(block)  # row i of block j scaled by its sign: diag(D_j) H


def global_rotation(dim: int, seed: int, stream: str) -> torch.Tensor:
    """Dense rotation [dim, dim] (float64): randomized Hadamard when dim is a power of two,
    else a Haar-random orthogonal matrix (QR of a seeded Gaussian, signs fixed)."""
    if dim & (dim - 1) == 0:
        return random_signs(dim, seed, stream).unsqueeze(1) * hadamard(dim)
    g = torch.randn(dim, dim, generator=_generator(seed, stream), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def make_rotation(kind: str, dim: int, block: int, seed: int, stream: str,
                  shared: bool = False) -> torch.Tensor | None:
    """The rotation of one position ('block_hadamard', 'global_hadamard' or 'none')."""
    if kind == "none":
        return None
    if kind == "block_hadamard":
        return block_rotation(dim, block, seed, stream, shared)
    if kind == "global_hadamard":
        return global_rotation(dim, seed, stream)
    raise ValueError(f"unknown rotation kind {kind!r}; expected one of {KINDS}")


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x [..., dim] -> x @ R, R given compactly ([b, b], [dim/b, b, b] or [dim, dim]).

    Computed in R's dtype when it is wider than x's, then cast back to x's dtype."""
    dim = x.shape[-1]
    b = r.shape[-1]
    if dim % b:
        raise ValueError(f"cannot rotate a dimension of {dim} with {b}x{b} blocks")
    cdtype = torch.promote_types(x.dtype, r.dtype)
    xb = x.to(cdtype).unflatten(-1, (dim // b, b))
    rr = r.to(device=x.device, dtype=cdtype)
    if rr.dim() == 3:
        if rr.shape[0] != dim // b:
            raise ValueError(f"rotation of shape {tuple(r.shape)} does not fit a dimension of {dim}")
        y = torch.einsum("...nb,nbc->...nc", xb, rr)
    else:
        y = xb @ rr
    return y.flatten(-2).to(x.dtype)


def rotate_weight_input(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """W [out, in] -> W R: the weight side of an input rotation (x R)(W R)^T = x W^T."""
    return rotate(w, r)


def rotate_weight_output(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """W [out, in] -> R^T W: the output y = x W^T becomes y R."""
    return rotate(w.t(), r).t().contiguous()


def dense(r: torch.Tensor, dim: int) -> torch.Tensor:
    """The full [dim, dim] matrix of a compact rotation (for tests and small models)."""
    return rotate(torch.eye(dim, dtype=r.dtype), r)
