"""Hessian-aware rounding (GPTQ / LDLQ) and the randomized Hadamard transform.

LDLQ (Chee et al. 2023, "QuIP", §3) is GPTQ's error feedback (Frantar et al. 2022, Alg. 1):
columns are rounded left to right and each column's rounding error is pushed onto the columns
not yet rounded through the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), which minimises
tr(Δ H Δᵀ) greedily:
    e_j = (w_j − q̂_j) / U_jj,     w_k ← w_k − e_j·U_jk  for every k > j,
where w_j is column j as updated by every earlier column and q̂_j its dequantized rounding.
Groups run along the columns, as in our storage format, and a group's scale/zero are chosen
when the loop reaches its first column, from the already-updated weights (GPTQ's "static
groups" off).

Two ways to do the same arithmetic with less work, both exact (in exact arithmetic; in floats
they only regroup the sums):
- lazy batch updates (GPTQ §3 "Lazy Batch-Updates"): the rank-1 updates stay inside a block of
  B columns and the columns after it get them all at once, W[:, i2:] −= E·U[i1:i2, i2:], one
  matrix product instead of B rank-1 passes over every later column. A group whose columns reach past the
  block gets the pending product for just its own columns when its parameters are chosen, so
  any B is correct for any group size;
- stacked variants: U depends on H alone and every row is rounded independently, so the
  roundings of one W at several (bits, group size) run as ONE sweep over a matrix of the
  variants stacked as rows — per-row grids (qmax, scale, zero) differ, U and the column order
  are shared. The profile samples every bit width × group size of a linear this way.

The randomized Hadamard transform (QuIP# — Tseng et al. 2024, §3) rotates a weight into an
incoherent basis. Ours is block-diagonal: a dimension d is split into contiguous blocks of
2^k = the largest power of two dividing d, each rotated by a normalised Sylvester Hadamard
after a random sign flip. No padding — a padded Q would change the stored shape and so the
exact bytes. Signs come from a seed, so they cost no bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from compressor.quant.grids import QuantMeta, group_params, quantize, signed_params
from solver.bytes import FP16_BITS, MAX_BITS, MIN_BITS

# Lazy-batch block size B per device type (any B is exact; it only regroups float sums).
# CUDA: 128, GPTQ's choice — kernel launches, not flops, bound the column loop there; the H200
# sweep is scripts/gpu_check_sampling.sh. CPU: B = 16…128 timed within noise of each other
# (`bitplan bench sampling`, 1536² and 8960×1536, the 8 profile variants stacked: memory
# bandwidth bounds both the in-block rank-1 passes and the trailing product), and 128 keeps
# 128-column groups bit-identical to the rounding before batching (whose B was the group size,
# rounded up to 128).
LAZY_BLOCK = {"cuda": 128, "cpu": 128}


def lazy_block(device: torch.device | str) -> int:
    """The lazy-batch block size for a device (128 where unmeasured)."""
    return LAZY_BLOCK.get(torch.device(device).type, 128)


def inverse_cholesky_upper(H: Tensor) -> Tensor:
    """U upper-triangular with H⁻¹ = UᵀU (float64 internally). H must be positive definite
    (damp it first); raises torch.linalg.LinAlgError otherwise."""
    Hd = H.double()
    L = torch.linalg.cholesky(Hd)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True).to(H.dtype)


def ldlq(W: Tensor, H: Tensor, bits: int, group_size: int, symmetric: bool = False,
         block_size: int | None = None, inv_chol: Tensor | None = None,
         ) -> tuple[Tensor, QuantMeta]:
    """Error-feedback rounding of W [m, n] against a positive-definite H [n, n] → (codes, meta)
    in exactly `quantize`'s format. 16 bits is a plain fp16 cast (nothing to feed back).
    `inv_chol`: `inverse_cholesky_upper(H)` when the caller already has it (see `ldlq_many`)."""
    return ldlq_many(W, H, [(bits, group_size)], symmetric, block_size, inv_chol)[0]


def ldlq_many(W: Tensor, H: Tensor, variants: Sequence[tuple[int, int]],
              symmetric: bool = False, block_size: int | None = None,
              inv_chol: Tensor | None = None, signed: bool = False
              ) -> list[tuple[Tensor, QuantMeta]]:
    """LDLQ / GPTQ roundings of one W [m, n] against one positive-definite H [n, n] at every
    (bits, group_size) of `variants`, in ONE column sweep → [(codes, meta)] in `variants`' order.

    Math (Chee et al. 2023, QuIP §3; Frantar et al. 2022, GPTQ Alg. 1): with H⁻¹ = UᵀU, column j
    of each row is rounded on that row's grid and its scaled error e_j = (w_j − q̂_j)/U_jj is fed
    to the later columns, w_k ← w_k − e_j·U_jk. U and the column order depend on H alone and
    rows never mix, so the k variants are stacked as rows, [W; W; …] ([k·m, n]), and swept
    once; a row keeps its own qmax = 2^bits − 1 and its own group's scale/zero, chosen when the
    sweep reaches the group's first column (the MSE-clipped grid of `quant.group_params`).
    Lazy batches (GPTQ §3 "Lazy Batch-Updates"): rank-1 updates stay inside a block of B
    columns and the later columns get E_blk·U[blk, i2:] once per block; a group reaching past
    its block first gets that pending product for its own columns, so any B is exact.

    Each result equals `ldlq(W, H, bits, group_size)` up to float summation order (tested:
    bit-identical codes in float64 to the unbatched textbook loop for every B). float32 math
    (float64 for a float64 W); memory k·m·n floats. `block_size`: B, default
    `lazy_block(W.device)`. Variants that round identically (the same bits, group sizes both
    ≥ n) are computed once; 16 bits is a plain fp16 cast. `inv_chol`: U of H when the caller
    already has it (`inverse_cholesky_upper(H)`, any float dtype: a linear's Q and R roundings
    share one H, and its O(n³) float64 factorizations dominate wide linears on a CPU).
    `signed`: the signed integer grid with zero 2^(b−1) (grids.signed_params, compressed-
    tensors' symmetric int; no rotation is applied here or anywhere in this function)."""
    if signed and symmetric:
        raise ValueError("the signed grid stores its zero (2^(b-1)): pass symmetric=False")
    m, n = W.shape
    out: list[tuple[Tensor, QuantMeta] | None] = [None] * len(variants)
    todo: dict[tuple[int, int], list[int]] = {}   # (bits, effective group) → variant indices
    for k, (bits, group_size) in enumerate(variants):
        if not (MIN_BITS <= bits <= MAX_BITS or bits == FP16_BITS):
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS} or 16, got {bits}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if bits == FP16_BITS or m * n == 0:
            out[k] = quantize(W, bits, group_size, symmetric)
        else:
            todo.setdefault((int(bits), min(int(group_size), n)), []).append(k)
    if todo:
        dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
        U = (inverse_cholesky_upper(H.to(dtype)) if inv_chol is None else inv_chol.to(dtype)
             ).to(W.device)
        block = block_size or lazy_block(W.device)
        rounded = _ldlq_stacked(W.detach().to(dtype), U, list(todo), symmetric, block, signed)
        for (codes, scale, zero), idx in zip(rounded, todo.values(), strict=True):
            for j, k in enumerate(idx):
                if j:  # callers own their tensors: duplicates get copies
                    codes, scale = codes.clone(), scale.clone()
                    zero = None if zero is None else zero.clone()
                bits, group_size = variants[k]
                out[k] = (codes, QuantMeta((m, n), bits, group_size, symmetric, scale, zero))
    return out


def _ldlq_stacked(W: Tensor, U: Tensor, variants: list[tuple[int, int]], symmetric: bool,
                  block: int, signed: bool = False
                  ) -> list[tuple[Tensor, Tensor, Tensor | None]]:
    """The sweep behind `ldlq_many` on W and U of one float dtype, group sizes ≤ n → per variant
    (codes [m, n] uint8, scale, zero). Works on X = [Wᵀ Wᵀ …] ([n, k·m]), so a column of every
    variant is one contiguous row and the trailing update is one [n−i2, B]·[B, k·m] product."""
    m, n = W.shape
    k = len(variants)
    dev = W.device
    X = W.T.repeat(1, k)                                    # [n, k·m]
    rows = [slice(v * m, (v + 1) * m) for v in range(k)]
    qmax = torch.cat([W.new_full((m,), float((1 << b) - 1)) for b, _ in variants])
    s_f, inv_s, off = torch.empty_like(qmax), torch.empty_like(qmax), torch.empty_like(qmax)
    floor = torch.zeros_like(qmax)
    qblk = X.new_empty(min(block, n), k * m)   # a block's codes, as floats until its end
    codes = torch.empty(n, k * m, dtype=torch.uint8, device=dev)
    scales = [torch.empty(m, -(-n // g), dtype=torch.float16, device=dev) for _, g in variants]
    zeros = [None if symmetric else torch.empty_like(s) for s in scales]
    diag = U.diagonal().tolist()
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        X1, U1 = X[i1:i2], U[i1:i2, i1:i2]
        err = X.new_empty(i2 - i1, k * m)
        for i in range(i2 - i1):
            col = i1 + i
            for v, (bits, g) in enumerate(variants):
                if col % g:
                    continue
                r = rows[v]
                x = X[col:min(col + g, i2), r]
                if col + g > i2 and i2 < n:   # the group reaches past the block: catch its
                    end = min(col + g, n)     # later columns up on this block's pending updates
                    tail = X[i2:end, r] - U[i1:col, i2:end].T @ err[:i, r]
                    x = torch.cat([x, tail])
                s, z = signed_params(x.T, bits) if signed else group_params(x.T, bits, symmetric)
                scales[v][:, col // g] = s
                if z is not None:
                    zeros[v][:, col // g] = z
                s_f[r] = s.float()
                inv_s[r] = 1.0 / s_f[r]
                off[r] = z.float() if z is not None else qmax[r] / 2
            # the body of quantize_with / dequantize_with, inlined: this loop runs n times
            # (in place into per-block buffers: the same float operations, fewer kernels)
            w, e = X1[i], err[i]
            q = torch.addcmul(off, w, inv_s, out=qblk[i]).round_().clamp_(floor, qmax)
            torch.sub(q, off, out=e).mul_(s_f)            # e = (w − (q − off)·s) / U_jj
            torch.sub(w, e, out=e).div_(diag[col])
            if i + 1 < i2 - i1:
                X1[i + 1:].addr_(U1[i, i + 1:], e, alpha=-1)
        codes[i1:i2] = qblk[:i2 - i1]                     # integers 0…qmax: exact as uint8
        if i2 < n:
            X[i2:].addmm_(U[i1:i2, i2:].T, err, alpha=-1)
    return [(codes[:, r].T.contiguous(), s, z) for r, s, z in zip(rows, scales, zeros, strict=True)]


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
