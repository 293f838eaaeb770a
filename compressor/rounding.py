"""Hessian-aware rounding (GPTQ / LDLQ) and the randomized Hadamard transform.

LDLQ (Chee et al. 2023, "QuIP", §3) is GPTQ's error feedback (Frantar et al. 2022, Alg. 1):
columns are rounded left to right and each column's rounding error is pushed onto the columns
not yet rounded through the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), which minimises
tr(Δ H Δᵀ) greedily. Groups run along the columns, as in our storage format, and a group's
scale/zero are chosen when the loop reaches its first column, from the already-updated weights
(GPTQ's "static groups" off). Lazy batch updates (GPTQ §"Lazy Batch-Updates") use blocks that
are a whole number of groups, so a group never straddles a block and its parameters always see
every earlier update.

The randomized Hadamard transform (QuIP# — Tseng et al. 2024, §3) rotates a weight into an
incoherent basis. Ours is block-diagonal: a dimension d is split into contiguous blocks of
2^k = the largest power of two dividing d, each rotated by a normalised Sylvester Hadamard
after a random sign flip. No padding — a padded Q would change the stored shape and so the
exact bytes. Signs come from a seed, so they cost no bytes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from compressor.quant import QuantMeta, group_params, quantize
from solver.bytes import FP16_BITS

_TARGET_BLOCK = 128


def inverse_cholesky_upper(H: Tensor) -> Tensor:
    """U upper-triangular with H⁻¹ = UᵀU (float64 internally). H must be positive definite
    (damp it first); raises torch.linalg.LinAlgError otherwise."""
    Hd = H.double()
    L = torch.linalg.cholesky(Hd)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True).to(H.dtype)


def ldlq(W: Tensor, H: Tensor, bits: int, group_size: int,
         symmetric: bool = False) -> tuple[Tensor, QuantMeta]:
    """Error-feedback rounding of W [m, n] against a positive-definite H [n, n] → (codes, meta)
    in exactly `quantize`'s format. 16 bits is a plain fp16 cast (nothing to feed back)."""
    m, n = W.shape
    if bits == FP16_BITS or m * n == 0:
        return quantize(W, bits, group_size, symmetric)
    W = W.detach().float().clone()
    U = inverse_cholesky_upper(H.float()).float()
    n_groups = -(-n // group_size)
    qmax = float((1 << bits) - 1)
    codes = torch.empty(m, n, dtype=torch.float32, device=W.device)
    scale = torch.empty(m, n_groups, dtype=torch.float16, device=W.device)
    zero = None if symmetric else torch.empty_like(scale)
    block = group_size * max(1, _TARGET_BLOCK // group_size)
    inv_s = s_f = off = None
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        err = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        diag = U1.diagonal().tolist()
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                s, z = group_params(W1[:, i:i + group_size], bits, symmetric)
                scale[:, g] = s
                if zero is not None:
                    zero[:, g] = z
                s_f = s.float()
                inv_s = 1.0 / s_f
                off = z.float() if z is not None else torch.full_like(s_f, qmax / 2)
            # the body of quantize_with / dequantize_with, inlined: this loop runs n times
            w = W1[:, i]
            q = torch.round(torch.addcmul(off, w, inv_s)).clamp_(0, qmax)
            codes[:, col] = q
            e = (w - (q - off) * s_f) / diag[i]
            W1[:, i:].addr_(e, U1[i, i:], alpha=-1)
            err[:, i] = e
        W[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1)
    codes = codes.to(torch.uint8)
    return codes, QuantMeta((m, n), bits, group_size, symmetric, scale, zero)


# ---- randomized Hadamard transform -------------------------------------------------------

def hadamard_block(dim: int) -> int:
    """Block size used for a dimension: its largest power-of-two divisor (1 = no rotation)."""
    return dim & -dim if dim > 0 else 1


def fwht(x: Tensor) -> Tensor:
    """Unnormalised fast Walsh–Hadamard transform (Sylvester order) along the last dim, whose
    size must be a power of two."""
    shape = x.shape
    n = shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two size, got {n}")
    y = x
    h = 1
    while h < n:
        y = y.reshape(*shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(shape)


def random_signs(dim: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """±1 of length `dim` from a CPU generator (identical on every device)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (dim,), generator=gen) * 2 - 1).float().to(device)


class BlockHadamard:
    """Orthogonal T = (1/√b)·blockdiag(H_b)·diag(signs) on one dimension. `apply` maps the row
    vectors of x ([..., dim]) to x·Tᵀ, `invert` to x·T."""

    def __init__(self, dim: int, seed: int, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.block = hadamard_block(dim)
        self.signs = random_signs(dim, seed, device)

    def _blocks(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = fwht(x.reshape(*lead, self.dim // self.block, self.block))
        return y.reshape(*lead, self.dim) / math.sqrt(self.block)

    def apply(self, x: Tensor) -> Tensor:
        return self._blocks(x * self.signs.to(x.dtype))

    def invert(self, x: Tensor) -> Tensor:
        return self._blocks(x) * self.signs.to(x.dtype)


def rotate_weight(W: Tensor, t_out: BlockHadamard, t_in: BlockHadamard) -> Tensor:
    """W' = T_out·W·T_inᵀ."""
    return t_out.apply(t_in.apply(W).T).T


def unrotate_weight(W: Tensor, t_out: BlockHadamard, t_in: BlockHadamard) -> Tensor:
    """W = T_outᵀ·W'·T_in (inverse of `rotate_weight`)."""
    return t_out.invert(t_in.invert(W).T).T


def rotate_hessian(H: Tensor, t_in: BlockHadamard) -> Tensor:
    """H' = T_in·H·T_inᵀ, so tr(Δ H Δᵀ) = tr(Δ' H' Δ'ᵀ) for Δ' = T_out Δ T_inᵀ."""
    return t_in.apply(t_in.apply(H).T).T
