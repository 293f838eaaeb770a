"""CALDERA decomposition W ≈ Q + L·R, fitted against calibration activations.

Saha et al. 2024, "Compressing Large Language Models using Low Rank and Low Precision
Decomposition" (CALDERA, arXiv 2405.18886). The objective is the activation-weighted error
‖(W − Q − LR)Xᵀ‖²_F = tr(Δ H Δᵀ), H = XᵀX (compressor.quant.hessian). Algorithm 1 alternates
    Q ← round(W − L·R)                 (RTN, or LDLQ/GPTQ error feedback against H)
    L, R ← LPLRFactorize(W − Q)         (Algorithm 2)
and LPLRFactorize starts from the closed-form H-weighted rank-r optimum — the truncated SVD of
(W − Q)·C with H = C·Cᵀ (any square root gives the same optimum; we use the Cholesky factor of
the damped H because R needs C⁻¹) — then alternates the two least-squares updates, each
followed by quantization of the updated factor:
    L ← round_L(A·H·R̂ᵀ·(R̂·H·R̂ᵀ)⁻¹)   LDLQ with the "Hessian" R̂·H·R̂ᵀ over L's rank columns
    R ← round_R((L̂ᵀL̂)⁻¹·L̂ᵀ·A)         LDLQ with H over R's input columns
The best iterate (by the undamped H-weighted error of what is actually stored) is kept,
including the rank-0 start Q = round(W) with L = R = 0, so at the same b_Q the decomposition is
never worse than Q alone. Optional randomized Hadamard incoherence (QuIP#, Tseng et al. 2024)
rotates W and H first; see compressor.quant.rounding for where it applies.

Work shared per linear (`Problem`, from `prepare`): the rotation, ‖W Xᵀ‖², and the float64
Cholesky factor of the damped H with the inverse factor U LDLQ feeds errors through — O(n³)
each, once per linear instead of once per rounding (the profile's Q-only sweep and anchors share
one Problem, and an anchor starts from the Q-only sample at its bits). Every result is bit-
identical to computing them afresh. `DecompositionConfig.gram_lplr` (off by default) trades the
residual's SVD and LPLR's [m, n]-wide error evaluations for r-wide products (see `_lplr`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor

from compressor.quant.decomposed import Decomposed, DecompositionConfig, Rounding, effective_config
from compressor.quant.grids import (
    QuantizedTensor,
    QuantMeta,
    dequantize,
    dequantize_rows,
    quantize,
)
from compressor.quant.hessian import damp_hessian
from compressor.quant.problem import (
    Problem,
    h_sq,
    lowrank_start,
    lr_err,
    prepare,
    residual,
    rotations,
)
from compressor.quant.rounding import ldlq, ldlq_many, unrotate_weight
from solver.bytes import FP16_BITS, Option, option_bytes


def _round(x: Tensor, H: Tensor, bits: int, option: Option, how: Rounding,
           inv_chol: Tensor | None = None) -> QuantizedTensor:
    if how is Rounding.LDLQ and x.numel():
        codes, meta = ldlq(x, H, bits, option.group_size, option.symmetric, inv_chol=inv_chol)
    else:
        codes, meta = quantize(x, bits, option.group_size, option.symmetric)
    return QuantizedTensor.from_codes(codes, meta)


def _psd_solve(G: Tensor, B: Tensor, damp: float) -> Tensor:
    """G⁻¹·B for a symmetric PSD G (float64, relative ridge so rank-deficient G is fine)."""
    Gd = damp_hessian(G.double(), damp)
    return torch.cholesky_solve(B.double(), torch.linalg.cholesky(Gd)).to(B.dtype)


def _lplr(A: Tensor, p: Problem, rank: int, option: Option, config: DecompositionConfig
          ) -> tuple[QuantizedTensor, QuantizedTensor, float, list]:
    """CALDERA Algorithm 2 on the residual A = W − Q: quantized L̂, R̂ minimising
    tr((A − L̂R̂) H (A − L̂R̂)ᵀ); returns the best pair, its squared error and the errors tried.
    A·Hd is formed once for both L solves. gram_lplr: the start from `lowrank_start`'s Gram
    route and errors from `lr_err` (A·Ht once, A·Hd = A·Ht + λ·A); otherwise the SVD and one
    tr(Δ H Δᵀ) per iterate, as the textbook loop."""
    fb, how, Hd, H = option.factor_bits, config.factor_rounding, p.Hd, p.Ht
    gram = config.gram_lplr
    u = p.u() if how is Rounding.LDLQ else None
    if gram:
        AHt = A @ H
        a2 = (AHt * A).sum(dtype=torch.float64).item()
        AHd = torch.add(AHt, A, alpha=(Hd.diagonal() - H.diagonal()).mean().item())

        def err_of(Ld: Tensor, Rd: Tensor) -> float:
            return lr_err(AHt, a2, Ld, Rd, H)
    else:
        AHd = A @ Hd

        def err_of(Ld: Tensor, Rd: Tensor) -> float:
            return h_sq(A - Ld @ Rd, H)
    # (L0 = U·S½ is not needed: L is re-solved exactly against the quantized R̂ below)
    R0 = lowrank_start(A, AHd, p, rank, gram)
    Rq = _round(R0, Hd, fb, option, how, u)
    best: tuple[float, QuantizedTensor | None, QuantizedTensor | None] = (float("inf"), None, None)
    tried = []
    small = 1e-6  # ridge of the r×r normal equations, relative to their mean diagonal
    for _ in range(config.lr_iters):
        Rd = Rq.dequantize()
        G = Rd @ Hd @ Rd.T
        L = _psd_solve(G, (AHd @ Rd.T).T, small).T          # L = A·H·R̂ᵀ·(R̂HR̂ᵀ)⁻¹
        Lq = _round(L, damp_hessian(G, config.damp), fb, option, how)
        Ld = Lq.dequantize()
        err = err_of(Ld, Rd)
        tried.append(err)
        if err < best[0]:
            best = (err, Lq, Rq)
        R = _psd_solve(Ld.T @ Ld, Ld.T @ A, small)               # R = (L̂ᵀL̂)⁻¹·L̂ᵀ·A
        Rq = _round(R, Hd, fb, option, how, u)
        err = err_of(Ld, Rq.dequantize())
        tried.append(err)
        if err < best[0]:
            best = (err, Lq, Rq)
    return best[1], best[2], best[0], tried


def _rows_of(Qq: QuantizedTensor, Lq: QuantizedTensor | None = None,
             Rq: QuantizedTensor | None = None) -> Callable[[int, int], Tensor]:
    """Rows a … b − 1 of Ŵ = Q̂ (+ L̂·R̂) as fresh float32 tensors (for `problem.residual`)."""
    codes = Qq.codes()
    if Lq is None:
        return partial(dequantize_rows, codes, Qq.meta)
    Ld, Rd = Lq.dequantize(), Rq.dequantize()
    return lambda a, b: dequantize_rows(codes, Qq.meta, a, b).add_(Ld[a:b] @ Rd)


@torch.no_grad()
def decompose(W: Tensor, H: Tensor, option: Option, config: DecompositionConfig | None = None,
              *, problem: Problem | None = None, q_start: QOnly | None = None) -> Decomposed:
    """W [out, in] ≈ Q + L·R stored as `option` says, fitted against H [in, in] (undamped,
    e.g. from collect_hessians). Runs on W's device; float32 math, float64 factorizations.

    Shortcuts with identical results: `problem` — `prepare(W, H, config)` of these W and H,
    shared by several calls (used when its config is the one this call runs with); `q_start` —
    the `QOnly` sample of these W, H, config at option's bits, group size and symmetry, whose Q
    is exactly the first rounding Q = round(W) (LDLQ rounds the rows independently)."""
    config = effective_config(option, config)
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be [m, n] and H [n, n]; got {tuple(W.shape)}, {tuple(H.shape)}")
    m, n = W.shape
    rank = min(option.rank, m, n)
    p = problem if problem is not None and problem.config == config else prepare(W, H, config)
    if p.Wt.shape != (m, n):
        raise ValueError(f"problem is for {tuple(p.Wt.shape)}, W is {(m, n)}")
    if q_start is not None:
        qo = q_start.option
        if q_start.config != config or (qo.bits, qo.group_size, qo.symmetric) != (
                option.bits, option.group_size, option.symmetric):
            raise ValueError(f"q_start ({qo}, {q_start.config}) is not this Q ({option}, {config})")
    Wt, Ht, w_norm2 = p.Wt, p.Ht, p.w_norm2

    zero_l = QuantizedTensor.quantize(Wt.new_zeros(m, rank), option.factor_bits,
                                      option.group_size, option.symmetric)
    zero_r = QuantizedTensor.quantize(Wt.new_zeros(rank, n), option.factor_bits,
                                      option.group_size, option.symmetric)
    LR = None   # the current L·R (none before the first LPLR: no W-sized zeros)
    best = None
    history: list[float] = []
    q_only = (0.0, 0.0)
    for t in range(config.outer_iters):
        if t == 0 and q_start is not None:
            Qq = QuantizedTensor.from_codes(q_start.codes, q_start.meta)
        else:
            ldlq_q = config.q_rounding is Rounding.LDLQ and Wt.numel()
            u = p.u() if ldlq_q else None
            target = Wt if LR is None else Wt - LR
            Qq = _round(target, p.Hd if ldlq_q else Ht, option.bits, option, config.q_rounding,
                        u)   # RTN never reads H: no damped copy made for it
            del target
        if t == 0:  # the rank-0 candidate: Q alone with zero factors
            if q_start is not None and math.isfinite(q_start.h_err2):
                q_only = (q_start.h_err2, q_start.fro2)   # its residual, measured already
            else:
                res = residual(Wt, Ht, _rows_of(Qq))   # Q̂ a row chunk at a time
                q_only = (res.err2, res.fro2)
            err0 = q_only[0]
            best = (err0, Qq, zero_l, zero_r)
            history.append((err0 / w_norm2) ** 0.5)
        if rank == 0:
            break
        Qd = Qq.dequantize()
        Lq, Rq, err, tried = _lplr(Wt - Qd, p, rank, option, config)
        history += [(e / w_norm2) ** 0.5 for e in tried]
        LR = Lq.dequantize() @ Rq.dequantize()
        if config.gram_lplr:   # _lplr's errors came from traces: measure the chosen one
            err = h_sq(Wt - Qd - LR, Ht)
        # (otherwise err is exactly h_sq(Wt − Qd − LR, Ht): the same float operations)
        if err < best[0]:
            best = (err, Qq, Lq, Rq)

    err, Qq, Lq, Rq = best
    fin = residual(Wt, Ht, _rows_of(Qq, Lq, Rq) if rank else _rows_of(Qq), outputs=True)
    wh_norm2, fro_err2 = fin.what2, fin.fro2
    cosine = fin.cross / max((w_norm2 * wh_norm2) ** 0.5, 1e-300)
    out = Decomposed(
        shape=(m, n), option=option, config=config, q=Qq.without_codes(),
        left=Lq.without_codes(), right=Rq.without_codes(),
        rel_h_err=(err / w_norm2) ** 0.5,
        rel_fro_err=(fro_err2 / p.fro2) ** 0.5,
        output_cosine=cosine,
        q_only_rel_h_err=(q_only[0] / w_norm2) ** 0.5,
        q_only_rel_fro_err=(q_only[1] / p.fro2) ** 0.5,
        history=history,
    )
    expected = option_bytes(m, n, option)
    if out.nbytes != expected:  # the storage format and the byte formula must never drift
        raise AssertionError(f"stored {out.nbytes} bytes, option_bytes says {expected}")
    return out


@dataclass
class QOnly:
    """A rank-0 decomposition without its packed tensors: what the profile samples."""

    option: Option
    config: DecompositionConfig
    codes: Tensor               # Q's codes and meta, in the (possibly) rotated basis
    meta: QuantMeta
    rel_h_err: float            # ‖(W − Q̂)Xᵀ‖ / ‖W Xᵀ‖ (undamped H), as `Decomposed.rel_h_err`
    # tr(Δ H Δᵀ) and ‖Δ‖²_F in the rotated basis (decompose's q_start reuses both)
    h_err2: float = math.nan
    fro2: float = math.nan

    def w_hat(self) -> Tensor:
        """Dense float32 Q̂ in the original basis (equals `Decomposed.w_hat` at rank 0)."""
        w = dequantize(self.codes, self.meta, torch.float32)
        if self.config.hadamard:
            w = unrotate_weight(w, *rotations(*self.meta.shape, self.config.seed, w.device))
        return w


@torch.no_grad()
def q_only_many(W: Tensor, H: Tensor, options: Sequence[Option],
                config: DecompositionConfig | None = None,
                problem: Problem | None = None) -> list[QOnly]:
    """`decompose(W, H, option, config)` at rank 0 for every option (ranks are ignored), with
    the LDLQ roundings of all of them in one stacked sweep (`rounding.ldlq_many`: one rotation,
    one inverse Cholesky, one column loop). rel_h_err equals decompose's up to float summation
    order (none at all for options whose lazy-batch blocks coincide). `problem`: as decompose's
    (`prepare(W, H, config)`), so the anchors of a profile share its factorizations."""
    config = config or DecompositionConfig()
    p = problem if problem is not None and problem.config == config else prepare(W, H, config)
    Wt, Ht = p.Wt, p.Ht
    out: dict[int, QOnly] = {}
    ldlq_jobs: dict[bool, list[int]] = {}              # symmetric → indices of options
    for k, opt in enumerate(options):
        if opt.bits == FP16_BITS:    # decompose drops the rotation here: let it say how
            d = decompose(W, H, replace(opt, rank=0), config)
            out[k] = QOnly(d.option, d.config, d.q.codes(), d.q.meta, d.rel_h_err)
        elif config.q_rounding is Rounding.LDLQ and Wt.numel():
            ldlq_jobs.setdefault(opt.symmetric, []).append(k)
        else:
            codes, meta = quantize(Wt, opt.bits, opt.group_size, opt.symmetric)
            out[k] = QOnly(opt, config, codes, meta, 0.0)
    for sym, idx in ldlq_jobs.items():
        variants = [(options[k].bits, options[k].group_size) for k in idx]
        rounded = ldlq_many(Wt, p.Hd, variants, sym, inv_chol=p.u())
        for k, (codes, meta) in zip(idx, rounded, strict=True):
            out[k] = QOnly(options[k], config, codes, meta, 0.0)
    for q in out.values():
        if q.option.bits != FP16_BITS:
            res = residual(Wt, Ht, partial(dequantize_rows, q.codes, q.meta))
            q.h_err2, q.fro2 = res.err2, res.fro2
            q.rel_h_err = (q.h_err2 / p.w_norm2) ** 0.5
    return [out[k] for k in range(len(options))]
