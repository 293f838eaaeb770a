"""Fitted per-linear error model E_i(b, r): the relative H-weighted squared error t² of linear i
stored as Q at b bits plus a rank-r correction.

Family (our choice; the reasons are physical and are checked on held-out points):

    E(b, r) = q(b) · [S(r) + c · (1 − S(r))]
    log q(b) = θ0 + θ1·(b − 4) + θ2·(b − 4)²

- q(b) is the Q-only error. Uniform quantization noise falls ~4× per extra bit (θ1 ≈ −ln 4);
  the quadratic term absorbs the departure at 2 bits, where clipping and coarse grids make the
  error grow faster than 4× (the research note's 59% → 9% → 1.7%).
- S(r) is the H-weighted spectral tail of the quantization residual: the share of ‖(W − Q)X‖²
  left after its best rank-r approximation. One SVD of (W − Q)·H^½ gives it for every rank at
  once; it is stored sampled at a few ranks and interpolated (log-linear) between them.
- c is the floor from storing L and R at low precision (the captured part 1 − S(r) is only
  recovered up to the factors' own relative quantization error).
θ and c are fitted per linear by least squares on log E (errors span decades).

Group size is a third choice (scales and zeros cost 32 bits per group): a larger group saves
bytes for a small error increase, which matters most near the 2-bit floor. It enters as a
measured factor, E(b, r, g) = κ_g(b) · E(b, r), with κ_g(b) = t²(b, 0, g) / t²(b, 0, g₀) sampled
Q-only at a few bit widths and interpolated log-linearly in b (κ_{g₀} = 1 for the profile's own
group g₀). `group_factors` maps str(g) → [[bits, κ], …]; empty means only g₀ is modelled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import least_squares

FAMILY = "qspec-v1"
_B0 = 4.0


@dataclass
class ErrorModel:
    theta: tuple[float, float, float]
    c: float
    tail_ranks: list[int]           # ranks at which S was sampled, ascending, starting at 0
    tail: list[float]               # S at those ranks, S(0) = 1, non-increasing
    r2_fit: float | None = None     # R² on the points it was fitted on (log space)
    group_factors: dict[str, list[list[float]]] = field(default_factory=dict)

    # ---- evaluation -------------------------------------------------------------------
    def spectral_tail(self, rank: np.ndarray | float) -> np.ndarray:
        r = np.asarray(rank, dtype=float)
        logs = np.log(np.clip(np.asarray(self.tail), 1e-12, None))
        return np.exp(np.interp(r, self.tail_ranks, logs))

    def q(self, bits: np.ndarray | float) -> np.ndarray:
        d = np.asarray(bits, dtype=float) - _B0
        t0, t1, t2 = self.theta
        return np.exp(t0 + t1 * d + t2 * d * d)

    def predict(self, bits: np.ndarray | float, rank: np.ndarray | float,
                group: int | None = None) -> np.ndarray:
        s = self.spectral_tail(rank)
        e = self.q(bits) * (s + self.c * (1.0 - s))
        return e if group is None else e * self.group_factor(bits, group)

    def groups(self) -> list[int]:
        return sorted(int(g) for g in self.group_factors)

    def group_factor(self, bits: np.ndarray | float, group: int) -> np.ndarray:
        """κ_g(b): 1 for the profiled group (or when no group was sampled); for a group size
        that was not sampled, interpolated in log₂ g between those that were (clamped)."""
        b = np.asarray(bits, dtype=float)
        if not self.group_factors:
            return np.ones_like(b)
        if str(group) not in self.group_factors:
            gs = self.groups()
            logk = np.stack([np.log(self.group_factor(b, g)) for g in gs])
            x = np.log2(np.asarray(gs, dtype=float))
            flat = logk.reshape(len(gs), -1)
            out = [np.interp(np.log2(group), x, flat[:, j]) for j in range(flat.shape[1])]
            return np.exp(np.asarray(out).reshape(b.shape))
        pts = np.asarray(self.group_factors[str(group)], dtype=float)
        order = np.argsort(pts[:, 0])
        return np.exp(np.interp(b, pts[order, 0], np.log(pts[order, 1])))

    # ---- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"family": FAMILY} | asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ErrorModel:
        if d.get("family") != FAMILY:
            raise ValueError(f"unknown error-model family {d.get('family')!r}")
        return cls(tuple(d["theta"]), d["c"], list(d["tail_ranks"]), list(d["tail"]),
                   d.get("r2_fit"), dict(d.get("group_factors") or {}))


def sample_tail(curve: Sequence[float], max_rank: int, points: int = 24) -> tuple[list[int], list[float]]:
    """Sample a spectral-tail curve S(0..) at `points` ranks, dense at small ranks (where it
    falls fastest) plus max_rank. `curve[r]` is the residual norm left at rank r."""
    curve = np.asarray(curve, dtype=float)
    max_rank = min(max_rank, len(curve) - 1)
    s = (curve / max(curve[0], 1e-300)) ** 2
    ranks = np.unique(np.round(np.geomspace(1, max(max_rank, 1), points - 1)).astype(int))
    ranks = np.concatenate([[0], ranks[ranks <= max_rank]])
    return ranks.tolist(), np.clip(s[ranks], 1e-12, 1.0).tolist()


def r2_log(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """R² of log errors (1 − SSE/SST); errors span decades, so log space is the fair scale."""
    a = np.log(np.clip(np.asarray(y_true, float), 1e-30, None))
    b = np.log(np.clip(np.asarray(y_pred, float), 1e-30, None))
    sst = float(((a - a.mean()) ** 2).sum())
    sse = float(((a - b) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else (1.0 if sse < 1e-12 else 0.0)


def fit(samples: Sequence[Sequence[float]], tail_ranks: Sequence[int],
        tail: Sequence[float]) -> ErrorModel:
    """Fit θ, c to samples [(bits, rank, E), …] given the sampled spectral tail."""
    arr = np.asarray(samples, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 3 or len(arr) < 3:
        raise ValueError("need at least 3 samples of (bits, rank, error)")
    b, r, y = arr[:, 0], arr[:, 1], np.clip(arr[:, 2], 1e-30, None)
    proto = ErrorModel((0.0, 0.0, 0.0), 0.0, list(tail_ranks), list(tail))
    s = proto.spectral_tail(r)
    d = b - _B0
    logy = np.log(y)

    def resid(p: np.ndarray) -> np.ndarray:
        c = math.exp(p[3])
        return p[0] + p[1] * d + p[2] * d * d + np.log(s + c * (1 - s)) - logy

    q0 = logy[r == 0]
    start = np.array([float(q0.mean()) if q0.size else float(logy.mean()), -math.log(4), 0.0,
                      math.log(0.05)])
    # θ2 ≥ 0 only if data demand it; bound c to a sane range (factor error ≤ 100%).
    res = least_squares(resid, start, bounds=([-80, -10, -2, math.log(1e-6)],
                                              [20, 2, 2, 0.0]), method="trf")
    p = res.x
    model = ErrorModel((float(p[0]), float(p[1]), float(p[2])), float(math.exp(p[3])),
                       list(tail_ranks), list(tail))
    model.r2_fit = r2_log(y, model.predict(b, r))
    return model


def group_factor_samples(group_size: int, group_bits: Sequence[int], extra_groups: Sequence[int],
                         base: dict[int, float], extra: Sequence[float]) -> dict:
    """`ErrorModel.group_factors` from Q-only samples: κ_g(b) = t²(b, g) / t²(b, g₀), with `base`
    the t² at the profiled group g₀ per bit width and `extra` the t² at every (g, b) of
    extra_groups × group_bits in that order (κ_{g₀} = 1)."""
    out = {str(group_size): [[b, 1.0] for b in group_bits]}
    errors = iter(extra)
    for g in extra_groups:
        out[str(g)] = [[b, next(errors) / max(base[b], 1e-30)] for b in group_bits]
    return out
