"""Lagrangian heuristic for very large menus: round the LP optimum down, then fill the leftover
bytes greedily.

The LP relaxation of MCKP has at most one fractional item (Sinha & Zoltners 1979), so rounding
it down loses at most one hull segment; the LP optimum is a certified lower bound, so the
returned gap is an honest optimality gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solver.mckp import Flat, LPCurve, Menu, lp_curve, totals


@dataclass(frozen=True)
class HeuristicResult:
    pos: np.ndarray       # menu position per item
    cost: int
    error: float
    lower_bound: float    # LP bound at the capacity

    @property
    def gap(self) -> float:
        return (self.error - self.lower_bound) / max(abs(self.error), 1e-300)


def fill(flat: Flat, pos: np.ndarray, cap: int, max_rounds: int = 10_000) -> np.ndarray:
    """Spend leftover bytes: repeatedly take the single upgrade with the largest error drop
    that still fits. Each round is one vectorised pass over every option."""
    pos = pos.copy()
    cur = flat.offsets + pos
    used = int(flat.cost[cur].sum())
    for _ in range(max_rounds):
        cur = flat.offsets + pos
        gain = flat.err[cur][flat.item] - flat.err
        extra = flat.cost - flat.cost[cur][flat.item]
        gain[(extra > cap - used) | (gain <= 0)] = -np.inf
        k = int(np.argmax(gain))
        if not np.isfinite(gain[k]):
            break
        used += int(extra[k])
        pos[flat.item[k]] = flat.pos[k]
    return pos


def greedy(menus: list[Menu], cap: int, curve: LPCurve | None = None) -> HeuristicResult:
    """Feasible plan within the LP gap; `cap` must be >= the cheapest plan."""
    curve = curve if curve is not None else lp_curve(menus)
    j, _lam, lp = curve.at(cap)
    pos = curve.vertex(j)
    if j < len(curve.slope):
        pos = fill(Flat.of(menus), pos, cap)
    cost, error = totals(menus, pos)
    return HeuristicResult(pos, cost, error, min(lp, error))
