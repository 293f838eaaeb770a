"""What a CALDERA decomposition is configured with and what it stores: the rounding method,
the frozen `DecompositionConfig` (part of every profile key) and `Decomposed` — Q, L and R as
quantized tensors in the (possibly Hadamard-rotated) basis, with the errors they were measured
at. `compressor.quant.decompose` computes them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

import torch
from torch import Tensor

from compressor.quant.grids import QuantizedTensor
from compressor.quant.problem import rotations
from compressor.quant.rounding import unrotate_weight
from solver.bytes import FP16_BITS, Option


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
    # LPLR from r-wide products (`_lplr`): the rank-r start from an eigendecomposition of the
    # residual's smaller Gram matrix instead of its full SVD, and every iterate's error from
    # traces instead of a product with H over [m, n]. The same math, other float rounding (a
    # few codes near ties move), so off by default: profiles and plans made without it keep
    # their numbers. Measured in `bitplan bench quant` (gram_lplr row).
    gram_lplr: bool = False

    def __post_init__(self) -> None:
        if self.outer_iters < 1 or self.lr_iters < 1:
            raise ValueError("outer_iters and lr_iters must be >= 1")
        if self.damp <= 0:
            raise ValueError("damp must be > 0 (the solves need a positive-definite H)")
        object.__setattr__(self, "q_rounding", Rounding(self.q_rounding))
        object.__setattr__(self, "factor_rounding", Rounding(self.factor_rounding))

    def to_dict(self) -> dict:
        """Every field, except later additions at their defaults: a config that does not use
        them keeps the dict (and so the profile key) it had before they existed."""
        d = asdict(self) | {"q_rounding": self.q_rounding.value,
                            "factor_rounding": self.factor_rounding.value}
        return {k: v for k, v in d.items() if not (k in _LATER and v == _LATER[k])}

    @classmethod
    def from_dict(cls, d: dict) -> DecompositionConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


_LATER = {"gram_lplr": False}   # fields added after profiles were first keyed → default


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
            w = unrotate_weight(w, *rotations(m, n, self.config.seed, w.device))
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


def effective_config(option: Option, config: DecompositionConfig | None) -> DecompositionConfig:
    """The config `decompose` runs `option` with: a dense fp16 Q has no rounding for incoherence
    to help, so it drops the rotation (unrotated, Q is the fp16 weight itself)."""
    config = config or DecompositionConfig()
    if option.bits == FP16_BITS and config.hadamard:
        return replace(config, hadamard=False)
    return config
