"""Rotations: orthogonality, structure, determinism and the weight-side fusion identities."""

from __future__ import annotations

import pytest
import torch

from vllm_brq import rotation


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.mark.parametrize("n", [1, 2, 16, 32, 64])
def test_hadamard_is_orthogonal_and_symmetric(n):
    h = rotation.hadamard(n)
    torch.testing.assert_close(h @ h.t(), torch.eye(n, dtype=h.dtype))
    torch.testing.assert_close(h, h.t())
    assert torch.all(h.abs() == h[0, 0].abs())


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        rotation.hadamard(24)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_block_rotation_is_block_diagonal_orthogonal(block):
    seed = _fresh_seed()
    dim = 4 * block
    r = rotation.block_rotation(dim, block, seed, "r1")
    assert r.shape == (dim // block, block, block)
    full = rotation.dense(r, dim)
    torch.testing.assert_close(full @ full.t(), torch.eye(dim, dtype=full.dtype), msg=f"seed {seed}")
    mask = torch.block_diag(*[torch.ones(block, block)] * (dim // block)).bool()
    assert torch.all(full[~mask] == 0)
    # signs first, then the Hadamard: R_i = diag(D_i) H, so R_i H^T is a +-1 diagonal
    d = r[1] @ rotation.hadamard(block).t()
    torch.testing.assert_close(d, torch.diag(torch.diagonal(d)))
    assert set(torch.diagonal(d).round().tolist()) <= {-1.0, 1.0}


def test_shared_block_rotation_is_one_block():
    r = rotation.block_rotation(128, 32, 0, "r4", shared=True)
    assert r.shape == (32, 32)
    torch.testing.assert_close(r @ r.t(), torch.eye(32, dtype=r.dtype))


@pytest.mark.parametrize("dim", [64, 96, 576])
def test_global_rotation_orthogonal(dim):
    g = rotation.global_rotation(dim, _fresh_seed(), "r1")
    torch.testing.assert_close(g @ g.t(), torch.eye(dim, dtype=g.dtype))


def test_rotations_are_deterministic_and_streams_differ():
    a = rotation.block_rotation(128, 32, 7, "r2.layer0")
    assert torch.equal(a, rotation.block_rotation(128, 32, 7, "r2.layer0"))
    assert not torch.equal(a, rotation.block_rotation(128, 32, 7, "r2.layer1"))
    assert not torch.equal(a, rotation.block_rotation(128, 32, 8, "r2.layer0"))
    g = rotation.global_rotation(96, 3, "x")
    assert torch.equal(g, rotation.global_rotation(96, 3, "x"))


@pytest.mark.parametrize("shape", ["shared", "blocks", "dense"])
def test_rotate_matches_dense_matmul(shape):
    seed = _fresh_seed()
    dim = 128
    r = {
        "shared": rotation.block_rotation(dim, 32, seed, "s", shared=True),
        "blocks": rotation.block_rotation(dim, 32, seed, "b"),
        "dense": rotation.global_rotation(dim, seed, "d"),
    }[shape]
    x = torch.randn(3, 5, dim, dtype=torch.float64)
    x[..., 7] *= 60  # outlier channel
    torch.testing.assert_close(rotation.rotate(x, r), x @ rotation.dense(r, dim), msg=f"seed {seed}")


def test_weight_fusion_preserves_the_linear():
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 96, dtype=torch.float64, generator=g)
    w = torch.randn(64, 96, dtype=torch.float64, generator=g)
    r_in = rotation.block_rotation(96, 32, seed, "in")
    r_out = rotation.block_rotation(64, 32, seed, "out")
    y = x @ w.t()
    torch.testing.assert_close(rotation.rotate(x, r_in) @ rotation.rotate_weight_input(w, r_in).t(), y)
    torch.testing.assert_close(x @ rotation.rotate_weight_output(w, r_out).t(), rotation.rotate(y, r_out))


def test_rotate_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="cannot rotate"):
        rotation.rotate(torch.randn(2, 48), rotation.hadamard(32))
    with pytest.raises(ValueError, match="does not fit"):
        rotation.rotate(torch.randn(2, 64), rotation.block_rotation(96, 32, 0, "x"))
    with pytest.raises(ValueError, match="not divisible"):
        rotation.block_rotation(100, 32, 0, "x")
    with pytest.raises(ValueError, match="unknown rotation kind"):
        rotation.make_rotation("spin", 64, 32, 0, "x")
