"""CALDERA decomposition W ≈ Q + L·R, fitted against calibration activations.

Saha et al. 2024, "Compressing Large Language Models using Low Rank and Low Precision
Decomposition" (CALDERA, arXiv 2405.18886). The objective is the activation-weighted error
‖(W − Q − LR)Xᵀ‖²_F = tr(Δ H Δᵀ), H = XᵀX (compressor.hessian). Algorithm 1 alternates
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
rotates W and H first; see compressor.rounding for where it applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

import torch
from torch import Tensor

from compressor.hessian import damp_hessian
from compressor.quant import QuantizedTensor, QuantMeta, dequantize, quantize
from compressor.rounding import (
    BlockHadamard,
    ldlq,
    ldlq_many,
    rotate_hessian,
    rotate_weight,
    unrotate_weight,
)
from solver.bytes import FP16_BITS, Option, option_bytes


class Rounding(StrEnum):
    RTN = "rtn"    # round to nearest
    LDLQ = "ldlq"  # Hessian-aware error feedback (GPTQ / LDLQ)


@dataclass(frozen=True)
class DecompositionConfig:
    q_rounding: Rounding = Rounding.LDLQ
    factor_rounding: Rounding = Rounding.LDLQ
    # Defaults measured on the demo model (blocks 3 and 9, b/r = 2/64, 3/32, 4/16): a second
    # outer iteration or a third L/R alternation changed the mean error by < 0.1% of itself
    # while costing 2–4× the time; the best-iterate rule makes more iterations safe, not useful.
    outer_iters: int = 1       # CALDERA Algorithm 1 iterations
    lr_iters: int = 2          # LPLRFactorize (Algorithm 2) alternations per outer iteration
    # Randomized Hadamard incoherence (QuIP#). On by default: on the same demo layers it
    # lowered the H-weighted error by 4–15% (Q alone) and 2–5% (Q + L·R), with no runtime or
    # byte cost (signs come from `seed`; CompressedLinear caches the un-rotated Ŵ).
    hadamard: bool = True
    damp: float = 0.01         # relative ridge: H + damp·mean(diag H)·I for every solve
    seed: int = 0              # Hadamard signs (out: seed, in: seed + 1)

    def __post_init__(self) -> None:
        if self.outer_iters < 1 or self.lr_iters < 1:
            raise ValueError("outer_iters and lr_iters must be >= 1")
        if self.damp <= 0:
            raise ValueError("damp must be > 0 (the solves need a positive-definite H)")
        object.__setattr__(self, "q_rounding", Rounding(self.q_rounding))
        object.__setattr__(self, "factor_rounding", Rounding(self.factor_rounding))

    def to_dict(self) -> dict:
        return asdict(self) | {"q_rounding": self.q_rounding.value,
                               "factor_rounding": self.factor_rounding.value}

    @classmethod
    def from_dict(cls, d: dict) -> DecompositionConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Decomposed:
    """Stored result of one linear: Q [m, n] at option.bits, L [m, r] and R [r, n] at
    option.factor_bits (r = min(option.rank, m, n)), all in the (possibly rotated) basis."""

    shape: tuple[int, int]
    option: Option
    config: DecompositionConfig
    q: QuantizedTensor
    left: QuantizedTensor
    right: QuantizedTensor
    rel_h_err: float            # ‖(W − Ŵ)Xᵀ‖ / ‖W Xᵀ‖ (undamped H)
    rel_fro_err: float          # ‖W − Ŵ‖_F / ‖W‖_F
    output_cosine: float        # cosine of the flattened outputs W Xᵀ and Ŵ Xᵀ
    q_only_rel_h_err: float     # the same error of the rank-0 start Q = round(W)
    q_only_rel_fro_err: float
    history: list[float] = field(default_factory=list)  # rel_h_err of every iterate tried

    @property
    def rank(self) -> int:
        return self.left.meta.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors; equals option_bytes(m, n, option) (tested)."""
        return self.q.nbytes + self.left.nbytes + self.right.nbytes

    def w_hat(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense Ŵ = Q + L·R in the original basis, [m, n] on the stored tensors' device."""
        w = self.q.dequantize(torch.float32)
        if self.rank:
            w = w + self.left.dequantize(torch.float32) @ self.right.dequantize(torch.float32)
        if self.config.hadamard:
            m, n = self.shape
            w = unrotate_weight(w, *_rotations(m, n, self.config.seed, w.device))
        return w.to(dtype)

    def tensors(self) -> dict[str, Tensor]:
        """Stored tensors keyed "q.packed", "q.scale", "l.zero", … (empty ones omitted)."""
        out = {}
        for part, qt in (("q", self.q), ("l", self.left), ("r", self.right)):
            out |= {f"{part}.{k}": v for k, v in qt.tensors().items()}
        return out

    def record(self) -> dict:
        """JSON-able description: everything but the tensors (the artifact manifest's entry)."""
        return {"shape": list(self.shape), "rank": self.rank, "option": self.option.to_dict(),
                "config": self.config.to_dict(), "nbytes": self.nbytes,
                "rel_h_err": self.rel_h_err, "rel_fro_err": self.rel_fro_err,
                "output_cosine": self.output_cosine, "q_only_rel_h_err": self.q_only_rel_h_err,
                "q_only_rel_fro_err": self.q_only_rel_fro_err}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], record: dict) -> Decomposed:
        m, n = record["shape"]
        r = record["rank"]
        opt = Option.from_dict(record["option"])
        fb, gs, sym = opt.factor_bits, opt.group_size, opt.symmetric

        def part(p: str, shape: tuple[int, int], bits: int) -> QuantizedTensor:
            own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(p + ".")}
            return QuantizedTensor.from_tensors(own, shape, bits, gs, sym)

        return cls((m, n), opt, DecompositionConfig.from_dict(record["config"]),
                   part("q", (m, n), opt.bits), part("l", (m, r), fb), part("r", (r, n), fb),
                   record["rel_h_err"], record["rel_fro_err"], record["output_cosine"],
                   record["q_only_rel_h_err"], record["q_only_rel_fro_err"])

    def to(self, device: torch.device | str) -> Decomposed:
        return Decomposed(self.shape, self.option, self.config, self.q.to(device),
                          self.left.to(device), self.right.to(device), self.rel_h_err,
                          self.rel_fro_err, self.output_cosine, self.q_only_rel_h_err,
                          self.q_only_rel_fro_err, list(self.history))


def _rotations(m: int, n: int, seed: int, device) -> tuple[BlockHadamard, BlockHadamard]:
    return BlockHadamard(m, seed, device), BlockHadamard(n, seed + 1, device)


def h_sq(delta: Tensor, H: Tensor) -> float:
    """tr(Δ H Δᵀ) = ‖Δ Xᵀ‖²_F, accumulated in float64."""
    return ((delta @ H) * delta).sum(dtype=torch.float64).clamp_min(0).item()


def h_norm(W: Tensor, H: Tensor) -> float:
    """‖W Xᵀ‖_F = sqrt(tr(W H Wᵀ))."""
    return h_sq(W.float(), H.float()) ** 0.5


def _round(x: Tensor, H: Tensor, bits: int, option: Option, how: Rounding) -> QuantizedTensor:
    if how is Rounding.LDLQ and x.numel():
        codes, meta = ldlq(x, H, bits, option.group_size, option.symmetric)
    else:
        codes, meta = quantize(x, bits, option.group_size, option.symmetric)
    return QuantizedTensor.from_codes(codes, meta)


def _psd_solve(G: Tensor, B: Tensor, damp: float) -> Tensor:
    """G⁻¹·B for a symmetric PSD G (float64, relative ridge so rank-deficient G is fine)."""
    Gd = damp_hessian(G.double(), damp)
    return torch.cholesky_solve(B.double(), torch.linalg.cholesky(Gd)).to(B.dtype)


def _lplr(A: Tensor, Hd: Tensor, C: Tensor, H: Tensor, rank: int, option: Option,
          config: DecompositionConfig) -> tuple[QuantizedTensor, QuantizedTensor, float, list]:
    """CALDERA Algorithm 2 on the residual A = W − Q: quantized L̂, R̂ minimising
    tr((A − L̂R̂) H (A − L̂R̂)ᵀ); returns the best pair, its squared error and the errors tried."""
    fb, how = option.factor_bits, config.factor_rounding
    # (L0 = U·S½ is not needed: L is re-solved exactly against the quantized R̂ below)
    _, S, Vh = torch.linalg.svd(A @ C, full_matrices=False)
    root = S[:rank].sqrt()
    # R0 = S½·Vhᵣ·C⁻¹  ⇔  Cᵀ·R0ᵀ = (S½·Vhᵣ)ᵀ  (C lower-triangular)
    R0 = torch.linalg.solve_triangular(C.T, (root[:, None] * Vh[:rank]).T, upper=True).T
    Rq = _round(R0, Hd, fb, option, how)
    best: tuple[float, QuantizedTensor | None, QuantizedTensor | None] = (float("inf"), None, None)
    tried = []
    small = 1e-6  # ridge of the r×r normal equations, relative to their mean diagonal
    for _ in range(config.lr_iters):
        Rd = Rq.dequantize()
        G = Rd @ Hd @ Rd.T
        L = _psd_solve(G, (A @ Hd @ Rd.T).T, small).T          # L = A·H·R̂ᵀ·(R̂HR̂ᵀ)⁻¹
        Lq = _round(L, damp_hessian(G, config.damp), fb, option, how)
        Ld = Lq.dequantize()
        err = h_sq(A - Ld @ Rd, H)
        tried.append(err)
        if err < best[0]:
            best = (err, Lq, Rq)
        R = _psd_solve(Ld.T @ Ld, Ld.T @ A, small)               # R = (L̂ᵀL̂)⁻¹·L̂ᵀ·A
        Rq = _round(R, Hd, fb, option, how)
        err = h_sq(A - Ld @ Rq.dequantize(), H)
        tried.append(err)
        if err < best[0]:
            best = (err, Lq, Rq)
    return best[1], best[2], best[0], tried


def rotated_problem(W: Tensor, H: Tensor, config: DecompositionConfig
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """float32 W0, symmetrised H0, their (possibly) rotated Wt, Ht, and the damped Hd."""
    W0 = W.detach().float()
    H0 = H.detach().float().to(W0.device)
    H0 = (H0 + H0.T) / 2
    if config.hadamard:
        rots = _rotations(*W0.shape, config.seed, W0.device)
        Wt, Ht = rotate_weight(W0, *rots), rotate_hessian(H0, rots[1])
    else:
        Wt, Ht = W0, H0
    return W0, H0, Wt, Ht, damp_hessian(Ht, config.damp)


@torch.no_grad()
def decompose(W: Tensor, H: Tensor, option: Option,
              config: DecompositionConfig | None = None) -> Decomposed:
    """W [out, in] ≈ Q + L·R stored as `option` says, fitted against H [in, in] (undamped,
    e.g. from collect_hessians). Runs on W's device; float32 math, float64 factorizations."""
    config = config or DecompositionConfig()
    if option.bits == FP16_BITS and config.hadamard:
        # a dense fp16 Q has no rounding for incoherence to help; unrotated, it is the fp16
        # weight itself (the record keeps this config, so w_hat does not unrotate it)
        config = replace(config, hadamard=False)
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be [m, n] and H [n, n]; got {tuple(W.shape)}, {tuple(H.shape)}")
    m, n = W.shape
    rank = min(option.rank, m, n)
    W0, H0, Wt, Ht, Hd = rotated_problem(W, H, config)
    w_norm2 = max(h_sq(W0, H0), 1e-300)
    fro2 = max(W0.pow(2).sum(dtype=torch.float64).item(), 1e-300)
    C = torch.linalg.cholesky(Hd.double()).float()

    zero_l = QuantizedTensor.quantize(W0.new_zeros(m, rank), option.factor_bits,
                                      option.group_size, option.symmetric)
    zero_r = QuantizedTensor.quantize(W0.new_zeros(rank, n), option.factor_bits,
                                      option.group_size, option.symmetric)
    LR = torch.zeros_like(Wt)
    best = None
    history: list[float] = []
    q_only = (0.0, 0.0)
    for t in range(config.outer_iters):
        Qq = _round(Wt - LR, Hd, option.bits, option, config.q_rounding)
        Qd = Qq.dequantize()
        if t == 0:  # the rank-0 candidate: Q alone with zero factors
            err0 = h_sq(Wt - Qd, Ht)
            q_only = (err0, (Wt - Qd).pow(2).sum(dtype=torch.float64).item())
            best = (err0, Qq, zero_l, zero_r)
            history.append((err0 / w_norm2) ** 0.5)
        if rank == 0:
            break
        Lq, Rq, _, tried = _lplr(Wt - Qd, Hd, C, Ht, rank, option, config)
        history += [(e / w_norm2) ** 0.5 for e in tried]
        LR = Lq.dequantize() @ Rq.dequantize()
        err = h_sq(Wt - Qd - LR, Ht)
        if err < best[0]:
            best = (err, Qq, Lq, Rq)

    err, Qq, Lq, Rq = best
    what = Qq.dequantize() + (Lq.dequantize() @ Rq.dequantize() if rank else 0)
    delta = Wt - what
    wh_norm2 = h_sq(what, Ht)
    cross = ((Wt @ Ht) * what).sum(dtype=torch.float64).item()
    cosine = cross / max((w_norm2 * wh_norm2) ** 0.5, 1e-300)
    out = Decomposed(
        shape=(m, n), option=option, config=config, q=Qq, left=Lq, right=Rq,
        rel_h_err=(err / w_norm2) ** 0.5,
        rel_fro_err=(delta.pow(2).sum(dtype=torch.float64).item() / fro2) ** 0.5,
        output_cosine=cosine,
        q_only_rel_h_err=(q_only[0] / w_norm2) ** 0.5,
        q_only_rel_fro_err=(q_only[1] / fro2) ** 0.5,
        history=history,
    )
    expected = option_bytes(m, n, option)
    if out.nbytes != expected:  # the storage format and the byte formula must never drift
        raise AssertionError(f"stored {out.nbytes} bytes, option_bytes says {expected}")
    return out


@torch.no_grad()
def lowrank_error_curve(residual: Tensor, H: Tensor) -> Tensor:
    """‖(A − A_r)Xᵀ‖_F of the best unquantized rank-r approximation A_r of `residual` A [m, n],
    for every r = 0 … min(m, n), from one SVD of A·H½ (float64; H½ from eigh with negative
    eigenvalues clipped, so a singular H is fine). Divide by h_norm(W, H) for relative errors.
    Non-increasing in r and exactly 0 at full rank."""
    A = residual.detach().double()
    Hs = (H.detach().double().to(A.device) + H.detach().double().to(A.device).T) / 2
    ev, V = torch.linalg.eigh(Hs)
    root = (V * ev.clamp_min(0).sqrt()) @ V.T
    s2 = torch.linalg.svdvals(A @ root).pow(2)
    # tail[r] = Σ_{i ≥ r} σ_i²  (reverse cumulative sum), with tail[min(m, n)] = 0
    tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
    return tail.clamp_min(0).sqrt()


@dataclass
class QOnly:
    """A rank-0 decomposition without its packed tensors: what the profile samples."""

    option: Option
    config: DecompositionConfig
    codes: Tensor               # Q's codes and meta, in the (possibly) rotated basis
    meta: QuantMeta
    rel_h_err: float            # ‖(W − Q̂)Xᵀ‖ / ‖W Xᵀ‖ (undamped H), as `Decomposed.rel_h_err`

    def w_hat(self) -> Tensor:
        """Dense float32 Q̂ in the original basis (equals `Decomposed.w_hat` at rank 0)."""
        w = dequantize(self.codes, self.meta, torch.float32)
        if self.config.hadamard:
            w = unrotate_weight(w, *_rotations(*self.meta.shape, self.config.seed, w.device))
        return w


@torch.no_grad()
def q_only_many(W: Tensor, H: Tensor, options: Sequence[Option],
                config: DecompositionConfig | None = None) -> list[QOnly]:
    """`decompose(W, H, option, config)` at rank 0 for every option (ranks are ignored), with
    the LDLQ roundings of all of them in one stacked sweep (`rounding.ldlq_many`: one rotation,
    one inverse Cholesky, one column loop). rel_h_err equals decompose's up to float summation
    order (none at all for options whose lazy-batch blocks coincide)."""
    config = config or DecompositionConfig()
    W0, H0, Wt, Ht, Hd = rotated_problem(W, H, config)
    w_norm2 = max(h_sq(W0, H0), 1e-300)
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
        for k, (codes, meta) in zip(idx, ldlq_many(Wt, Hd, variants, sym), strict=True):
            out[k] = QOnly(options[k], config, codes, meta, 0.0)
    for q in out.values():
        if q.option.bits != FP16_BITS:
            q.rel_h_err = (h_sq(Wt - dequantize(q.codes, q.meta), Ht) / w_norm2) ** 0.5
    return [out[k] for k in range(len(options))]
