"""GPTQ onto the MXFP4 grid (Frantar et al. 2022, with MR-GPTQ's static MX groups), or onto
FP8 e4m3 with a scale per row (the FP8 lm_head).

The whole algorithm in one class:
- Hessian H = X^T X / n accumulated from the linear's inputs (after its online rotation).
- Static scales: each 32-column group's E8M0 exponent (MXFP4), or each row's max / 448
  (FP8), is fixed from the weight *before* GPTQ (MXFP4 exponents optionally searched among
  e-1, e, e+1 for the lowest H-diagonal-weighted RTN error), so act-order can visit columns
  in any order without moving scales.
- Act-order: columns by decreasing H diagonal; relative damping 0.01 * mean(diag H);
  blocks of 128 columns with the lazy-batch update of the remaining columns.
Rows are independent given H, so linears that read the same input (q/k/v, gate/up) are
quantized together as one stacked weight.
"""

from __future__ import annotations

import torch

from vllm_brq import mxfp4
from vllm_brq.kernels.reference import E4M3_MAX, fp8_row_scales

SEARCH_OFFSETS = (0, -1, 1)  # ties keep the standard exponent
GRIDS = ("mxfp4", "fp8_rows")


class GPTQ:
    def __init__(self, columns: int, device: torch.device | str = "cpu",
                 block_size: int = 128, damp: float = 0.01, act_order: bool = True,
                 scale_search: bool = False, grid: str = "mxfp4"):
        if grid not in GRIDS:
            raise ValueError(f"unknown GPTQ grid {grid!r}; expected one of {GRIDS}")
        self.h_sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.count = 0
        self.block_size, self.damp, self.act_order, self.scale_search = block_size, damp, act_order, scale_search
        self.grid = grid

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.h_sum.device, torch.float32)
        self.h_sum.addmm_(x.t(), x)
        self.count += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.h_sum / max(self.count, 1)

    def exponents(self, w: torch.Tensor, hdiag: torch.Tensor) -> torch.Tensor:
        """Per-group exponents [rows, cols/32] of the static groups."""
        e = mxfp4.block_exponents(w)
        if not self.scale_search:
            return e
        wg = w.unflatten(-1, (-1, mxfp4.BLOCK))
        hg = hdiag.unflatten(-1, (-1, mxfp4.BLOCK))
        best_err, best = None, e
        for off in SEARCH_OFFSETS:
            cand = (e + off).clamp(-mxfp4.SCALE_BIAS, mxfp4.SCALE_BIAS)
            s = torch.exp2(cand.float()).unsqueeze(-1)
            err = ((wg - mxfp4.round_to_e2m1(wg / s) * s) ** 2 * hg).sum(-1)
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best = torch.where(better, cand, best)
                best_err = torch.where(better, err, best_err)
        return best

    def scales(self, w: torch.Tensor, hdiag: torch.Tensor) -> torch.Tensor:
        """The static scale of every weight [rows, cols]: 2^e of its 32-group, or its row's."""
        if self.grid == "fp8_rows":
            return fp8_row_scales(w).expand_as(w)
        return torch.exp2(self.exponents(w, hdiag).float()).repeat_interleave(mxfp4.BLOCK, 1)

    def round(self, v: torch.Tensor) -> torch.Tensor:
        """v (weights over their scales) to the nearest grid value, ties to even."""
        if self.grid == "fp8_rows":
            return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
        return mxfp4.round_to_e2m1(v)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """The quantized weight (float32 values on the grid times their scales, same shape)."""
        w = weight.to(self.h_sum.device, torch.float32).clone()
        rows, cols = w.shape
        h = self.hessian.clone()
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1
        scale = self.scales(w, torch.diagonal(h))
        w[:, dead] = 0
        if self.act_order:
            perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
            w, scale, h = w[:, perm], scale[:, perm], h[perm][:, perm]
        u = self._inverse_cholesky(h)
        # work on W^T so each weight column is one contiguous row
        wt, st = w.t().contiguous(), scale.t().contiguous()
        qt = torch.empty_like(wt)
        for i1 in range(0, cols, self.block_size):
            i2 = min(i1 + self.block_size, cols)
            w1, u1 = wt[i1:i2], u[i1:i2, i1:i2]
            err1 = torch.empty_like(w1)
            for j in range(i2 - i1):
                s = st[i1 + j]
                qt[i1 + j] = self.round(w1[j] / s) * s
                torch.div(w1[j] - qt[i1 + j], u1[j, j], out=err1[j])
                w1[j + 1:].addr_(u1[j, j + 1:], err1[j], alpha=-1)
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1)
        q = qt.t()
        if self.act_order:
            q = q[:, torch.argsort(perm)]
        return q.contiguous()

    def _inverse_cholesky(self, h: torch.Tensor) -> torch.Tensor:
        """Upper Cholesky factor of H^-1 after damping (damping grows if H is singular)."""
        damp = self.damp * torch.diagonal(h).mean()
        eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
        for _ in range(5):
            l, info = torch.linalg.cholesky_ex(h + damp * eye)
            if not info:  # H^-1 = L^-T L^-1 (torch.cholesky_inverse is pathologically slow on CPU)
                l_inv = torch.linalg.solve_triangular(l, eye, upper=False)
                return torch.linalg.cholesky(l_inv.t() @ l_inv, upper=True)
            damp = damp * 10
        raise RuntimeError("GPTQ: the Hessian stays singular after damping")

    def output_sq_error(self, weight: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, ||X (W - Q)^T||^2 / n and ||X W^T||^2 / n from the Hessian (no data pass)."""
        h = self.hessian
        w = weight.to(h.device, torch.float32)
        d = w - q.to(h.device, torch.float32)
        return ((d @ h) * d).sum(1), ((w @ h) * w).sum(1)
