"""What every rounding and solve of one linear's decomposition shares, and the linear algebra of
LPLR's start (CALDERA, Saha et al. 2024, Algorithm 2) — see compressor.quant.decompose.

A `Problem` holds W and H as decompose solves them (float32, H symmetrised, both Hadamard-
rotated when the config says so, H damped) and, computed on first use, the float64 Cholesky
factor of the damped H: LPLR's square root C (Hd = C·Cᵀ) and LDLQ's inverse factor U
(Hd⁻¹ = UᵀU, compressor.quant.rounding). These are O(n³) each and the same for every rounding of the
linear (its Q, every R, every Q-only sample and anchor of the profile), so they are made once;
the results are bit-identical to making them per rounding.

Also here: the H-weighted traces every error is measured with (`h_inner`, `h_sq`, `residual`,
run a row chunk at a time so no W-sized product is ever formed: a rank-0 decomposition of a
real-width linear needs W, H and less than one more W), and the residual's unquantized low-rank
error curve the profile samples (`lowrank_error_curve`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from compressor.quant.grids import chunk_rows
from compressor.quant.hessian import damp_hessian
from compressor.quant.rounding import (
    BlockHadamard,
    rotate_hessian,
    rotate_weight,
)

# `config` below is a compressor.quant.decompose.DecompositionConfig (not imported: decompose imports
# this module); only its hadamard, seed and damp fields are read here.

def rotations(m: int, n: int, seed: int, device) -> tuple[BlockHadamard, BlockHadamard]:
    return BlockHadamard(m, seed, device), BlockHadamard(n, seed + 1, device)


def h_inner(A: Tensor, B: Tensor, H: Tensor) -> float:
    """tr(A H Bᵀ) = ⟨A Xᵀ, B Xᵀ⟩_F (H float32), accumulated in float64 over row chunks, each
    upcast to float32: A·H is never formed whole (for a 5632-wide linear that saves two
    W-sized float32 temporaries) and a half-precision A or B is never copied whole."""
    step = chunk_rows(A.shape[1])
    total = torch.zeros((), dtype=torch.float64, device=A.device)
    for a in range(0, A.shape[0], step):
        total += ((A[a:a + step].float() @ H) * B[a:a + step].float()).sum(dtype=torch.float64)
    return total.item()


def h_sq(delta: Tensor, H: Tensor) -> float:
    """tr(Δ H Δᵀ) = ‖Δ Xᵀ‖²_F, accumulated in float64 (row-chunked: `h_inner`)."""
    return max(h_inner(delta, delta, H), 0.0)


@dataclass
class Residual:
    """Of Δ = W − Ŵ: err2 = tr(Δ H Δᵀ), fro2 = ‖Δ‖²_F; with `outputs`, also
    what2 = tr(Ŵ H Ŵᵀ) and cross = tr(Ŵ H Wᵀ) (else NaN)."""

    err2: float
    fro2: float
    what2: float = math.nan
    cross: float = math.nan


def residual(W: Tensor, H: Tensor, what_rows: Callable[[int, int], Tensor],
             outputs: bool = False) -> Residual:
    """`Residual` of W [m, n] against Ŵ given a row chunk at a time (what_rows(a, b): a fresh
    float32 [b − a, n] tensor, rows a … b − 1 of Ŵ), so neither Ŵ nor W − Ŵ is ever whole.
    The chunks are h_inner's and fro_sq's, so err2 and fro2 are bit-identical to
    h_sq(W − Ŵ, H) and fro_sq(W − Ŵ)."""
    m, n = W.shape
    step = chunk_rows(n)
    acc = torch.zeros(4, dtype=torch.float64, device=W.device)
    for a in range(0, m, step):
        w_hat = what_rows(a, a + step)
        if outputs:
            wh = w_hat @ H
            acc[2] += (wh * w_hat).sum(dtype=torch.float64)
            acc[3] += (wh * W[a:a + step]).sum(dtype=torch.float64)
            del wh
        d = torch.sub(W[a:a + step], w_hat, out=w_hat)
        acc[0] += ((d @ H) * d).sum(dtype=torch.float64)
        acc[1] += d.pow(2).sum(dtype=torch.float64)
    err2, fro2, what2, cross = acc.tolist()
    if not outputs:
        return Residual(max(err2, 0.0), fro2)
    return Residual(max(err2, 0.0), fro2, max(what2, 0.0), cross)


def fro_sq(delta: Tensor) -> float:
    """‖Δ‖²_F in float64, over row chunks (no squared copy of Δ)."""
    step = chunk_rows(delta.shape[-1])
    d2 = delta.reshape(-1, delta.shape[-1])
    total = torch.zeros((), dtype=torch.float64, device=delta.device)
    for a in range(0, d2.shape[0], step):
        total += d2[a:a + step].pow(2).sum(dtype=torch.float64)
    return total.item()


def h_norm(W: Tensor, H: Tensor) -> float:
    """‖W Xᵀ‖_F = sqrt(tr(W H Wᵀ))."""
    return h_sq(W, H.float()) ** 0.5


@dataclass
class Problem:
    """One linear's problem as `decompose` solves it, and what all its roundings share: W0, H0
    (float32, H symmetrised), Wt, Ht (Hadamard-rotated when config.hadamard), the damped Hd,
    w_norm2 = tr(W0 H0 W0ᵀ) and fro2 = ‖W0‖²_F (both floored), and — on first use, from one
    float64 Cholesky of Hd — C with Hd = C·Cᵀ (LPLR's square root) and U with Hd⁻¹ = UᵀU (LDLQ's).
    `prepare(W, H, config)` makes one; hand it only to calls on the same W, H and config."""

    config: Any
    W0: Tensor
    H0: Tensor | None   # dropped once w_norm2 is known when rotated (Ht is what is solved)
    Wt: Tensor
    Ht: Tensor
    w_norm2: float
    fro2: float
    _hd: Tensor | None = field(default=None, repr=False)
    _c: Tensor | None = field(default=None, repr=False)
    _u: Tensor | None = field(default=None, repr=False)

    @property
    def Hd(self) -> Tensor:
        """The damped Ht, made on first use (RTN rounding at rank 0 never needs it)."""
        if self._hd is None:
            self._hd = damp_hessian(self.Ht, self.config.damp)
        return self._hd

    def _factor(self) -> None:
        """C and U from one float64 Cholesky of Hd, each temporary freed as soon as the next
        exists (n = 5632: five n² float32s at most, not eight; two held after, not four). The
        operations are `inverse_cholesky_upper`'s, so U is bit-identical to it."""
        hd = self.Hd.double()
        chol = torch.linalg.cholesky(hd)
        del hd
        self._c = chol.float()
        inv = torch.cholesky_inverse(chol)
        del chol
        u = torch.linalg.cholesky(inv, upper=True)
        del inv
        self._u = u.to(self.Hd.dtype)

    def c(self) -> Tensor:
        """C (float32, lower) with Hd = C·Cᵀ."""
        if self._c is None:
            self._factor()
        return self._c

    def u(self) -> Tensor:
        """U (float32, upper) with Hd⁻¹ = UᵀU: exactly `rounding.inverse_cholesky_upper(Hd)`."""
        if self._u is None:
            self._factor()
        return self._u


def symmetric(H: Tensor, block: int = 1024) -> bool:
    """H == Hᵀ exactly, compared a block pair at a time (no n × n temporary)."""
    n = H.shape[0]
    for a in range(0, n, block):
        for b in range(a, n, block):
            if not torch.equal(H[a:a + block, b:b + block], H[b:b + block, a:a + block].T):
                return False
    return True


def _rotated(W: Tensor, H: Tensor, config: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    W0 = W.detach().float()
    H0 = H.detach().float().to(W0.device)
    if not symmetric(H0):   # calibration Hessians are symmetrised at the source (hessian.py)
        H0 = H0 + H0.T
        H0.div_(2)          # = (H0 + H0ᵀ) / 2 bit for bit, one n × n temporary fewer
    if config.hadamard:
        rots = rotations(*W0.shape, config.seed, W0.device)
        return W0, H0, rotate_weight(W0, *rots), rotate_hessian(H0, rots[1])
    return W0, H0, W0, H0


def rotated_problem(W: Tensor, H: Tensor, config: Any
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """float32 W0, symmetrised H0, their (possibly) rotated Wt, Ht, and the damped Hd."""
    W0, H0, Wt, Ht = _rotated(W, H, config)
    return W0, H0, Wt, Ht, damp_hessian(Ht, config.damp)


@torch.no_grad()
def prepare(W: Tensor, H: Tensor, config: Any) -> Problem:
    """The shared `Problem` of W [m, n] and H [n, n] under `config` (Hd and factorizations
    lazy). A symmetric H (every calibration Hessian) is used as it is, not copied."""
    W0, H0, Wt, Ht = _rotated(W, H, config)
    w_norm2 = max(h_sq(W0, H0), 1e-300)
    return Problem(config, W0, H0 if H0 is Ht else None, Wt, Ht, w_norm2,
                   max(fro_sq(W0), 1e-300))


def lowrank_start(A: Tensor, AHd: Tensor, p: Problem, rank: int, gram: bool) -> Tensor:
    """R0 = S½·Vhᵣ·C⁻¹ from the top-`rank` SVD B = A·C = U·S·Vh (Hd = C·Cᵀ = p.c()·p.c()ᵀ;
    AHd = A·Hd).

    gram: from the eigendecomposition (float64) of the smaller Gram matrix instead of the SVD —
    m < n: B·Bᵀ = A·Hd·Aᵀ = U·S²·Uᵀ, and Vhᵣ = S⁻¹·Uᵣᵀ·B gives R0 = S^-½·Uᵣᵀ·A (no C at all);
    m ≥ n: Bᵀ·B = Cᵀ·(AᵀA)·C = V·S²·Vᵀ. Directions with S ≈ 0 get zero rows, as in the SVD."""
    m, n = A.shape
    if gram and m < n:
        ev, V = torch.linalg.eigh(AHd.double() @ A.T.double())
        s2, Ur = ev.flip(0)[:rank], V.flip(1)[:, :rank]
        live = s2 > s2[0].clamp_min(1e-300) * 1e-6   # below: float32 noise of the Gram
        scale = torch.where(live, s2.clamp_min(1e-300).pow(-0.25), 0.0)
        return (scale[:, None] * (Ur.T @ A.double())).float()
    C = p.c()
    if not gram:
        _, S, Vh = torch.linalg.svd(A @ C, full_matrices=False)
        top = S[:rank].sqrt()[:, None] * Vh[:rank]
    else:
        B = (A @ C).double()
        ev, V = torch.linalg.eigh(B.T @ B)
        s2, Vr = ev.flip(0)[:rank].clamp_min(0), V.flip(1)[:, :rank]
        top = (s2.pow(0.25)[:, None] * Vr.T).float()
    # R0 = S½·Vhᵣ·C⁻¹  ⇔  Cᵀ·R0ᵀ = (S½·Vhᵣ)ᵀ  (C lower-triangular)
    return torch.linalg.solve_triangular(C.T, top.T, upper=True).T


def lr_err(AH: Tensor, a2: float, Ld: Tensor, Rd: Tensor, H: Tensor) -> float:
    """tr((A − LR)·H·(A − LR)ᵀ) = tr(A·H·Aᵀ) − 2⟨L, (A·H)·Rᵀ⟩ + ⟨LᵀL, R·H·Rᵀ⟩ from a2 = tr(A·H·Aᵀ)
    and AH = A·H: r-wide products only (float64 sums; cancellation is mild since the error is
    a large fraction of a2 at any useful rank)."""
    cross = (Ld * (AH @ Rd.T)).sum(dtype=torch.float64)
    quad = ((Ld.T @ Ld).double() * (Rd @ H @ Rd.T).double()).sum()
    return max((a2 - 2 * cross + quad).item(), 0.0)


@torch.no_grad()
def lowrank_error_curve(residual: Tensor, H: Tensor) -> Tensor:
    """‖(A − A_r)Xᵀ‖_F of the best unquantized rank-r approximation A_r of `residual` A [m, n],
    for every r = 0 … min(m, n): the tail sums of the squared singular values of A·H½ (Eckart–
    Young), read as the eigenvalues of the smaller Gram matrix in float64 — A H Aᵀ [m, m] when
    m ≤ n (no square root of H needed), else H½ AᵀA H½ [n, n] with H½ from eigh, negative
    eigenvalues clipped (a singular H is fine). The Gram's eigenvalues replace an SVD of the
    m × n product: same values to float64 rounding, ~10× faster on a 576 × 1536 down_proj.
    Divide by h_norm(W, H) for relative errors. Non-increasing in r and exactly 0 at full rank."""
    A = residual.detach().double()
    Hd = H.detach().double().to(A.device)
    Hs = (Hd + Hd.T) / 2
    m, n = A.shape
    if m <= n:
        gram = A @ Hs @ A.T
    else:
        ev, V = torch.linalg.eigh(Hs)
        root = (V * ev.clamp_min(0).sqrt()) @ V.T
        B = A @ root
        gram = B.T @ B
    s2 = torch.linalg.eigvalsh((gram + gram.T) / 2).clamp_min(0).flip(0)   # descending
    # tail[r] = Σ_{i ≥ r} σ_i²  (reverse cumulative sum), with tail[min(m, n)] = 0
    tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
    return tail.clamp_min(0).sqrt()
