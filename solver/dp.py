"""Exact MCKP without a budget grid, and the complete Pareto frontier.

Exact solve (`solve_exact`), in the spirit of Pisinger's "minimal algorithm" for MCKP (Pisinger
1995, EJOR 83) and Dyer-Kayal-Walker's reduction (1984):
1. LP relaxation by the hull-segment walk (solver.mckp); its critical slope λ is the optimal
   Lagrange multiplier and gives the bound LB and a rounded plan; `greedy` improves that to UB.
2. Reduction: for any plan x within the budget, error(x) >= LB + Σ_i r_i(x_i), where
   r_io = e_io + λ·c_io - min_o' (e_io' + λ·c_io') >= 0 is the option's reduced cost. So a plan
   with error <= LB + δ only uses options with r_io <= δ; every other option is dropped and
   items left with one option are fixed.
3. DP over Pareto sets of (bytes, error) states (Nemhauser & Ullmann 1969; Klamroth & Wiecek
   2000 for the multiple-choice case), adding one surviving item at a time, with two exact
   prunings: dominance (a state costing more and erring no less is dropped) and bounding (a
   state whose error plus the LP bound of the remaining items at the remaining bytes exceeds
   LB + δ cannot finish under the threshold).
4. δ (how far above LB a plan may err and still be looked for) starts at (UB - LB) / 64
   (`DELTA_START`) and is multiplied by 3 (`DELTA_GROWTH`) after each DP that finds no plan,
   capped at UB - LB (so at most 1 + ceil(log_3 64) = 5 DP runs), until the DP finds a plan,
   which is then the optimum: every plan with error <= LB + δ survived all prunings.
   δ = UB - LB always succeeds (the UB plan qualifies). Real problems sit very close to their
   LP bound, so the first or second δ usually suffices and only a few hundred options ever
   enter the DP.

All costs are exact integers; errors are floats and thresholds carry a tiny relative tolerance
that only ever keeps more states, never fewer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from solver.greedy import greedy
from solver.mckp import Flat, LPCurve, Menu, error_scale, hull_segments, lp_curve, pareto_indices

REL_TOL = 1e-10
# DP candidates (all runs together) before giving up. Real menus need well under 10M; strongly
# correlated menus (errors almost linear in bytes, the classic hard MCKP case) can need far more,
# and the caller then falls back to CP-SAT seeded with the best plan found.
MAX_WORK = 20_000_000
DELTA_START = 1.0 / 64  # first δ as a fraction of UB - LB
DELTA_GROWTH = 3.0  # δ ×3 after each DP run that finds no plan (a bigger δ keeps more options)


class FrontierTooLarge(ValueError):
    """The complete Pareto set outgrew the caller's `max_points`."""


class _WorkExceeded(Exception):
    pass


@dataclass
class ExactResult:
    pos: np.ndarray           # optimal menu position per item
    cost: int
    error: float
    lower_bound: float        # the LP bound (the optimum itself once proven)
    stats: dict = field(default_factory=dict)
    proven: bool = True       # False: MAX_WORK hit, pos is the heuristic plan


def solve_exact(menus: list[Menu], cap: int, curve: LPCurve | None = None,
                max_work: int | None = None) -> ExactResult:
    """The optimum of min Σ err s.t. Σ cost <= cap. `cap` must be >= the cheapest plan.
    Past `max_work` DP candidates it returns the heuristic plan with proven=False."""
    curve = curve if curve is not None else lp_curve(menus)
    if cap < curve.cost[0]:
        raise ValueError(f"capacity {cap} is below the cheapest plan {int(curve.cost[0])}")
    j, lam, lb = curve.at(cap)
    heur = greedy(menus, cap, curve)
    stats: dict = {"lp_bound": lb, "heuristic_error": heur.error, "dp_runs": 0, "work": 0,
                   "max_work": MAX_WORK if max_work is None else max_work}
    tol = REL_TOL * error_scale(menus)
    gap = heur.error - lb
    if j >= len(curve.slope) or gap <= tol:
        return ExactResult(heur.pos, heur.cost, heur.error, heur.error, stats)

    flat = Flat.of(menus)
    # bytes above each item's cheapest option keep λ·c small next to the errors (precision)
    red = flat.err + lam * (flat.cost - flat.cost[flat.offsets][flat.item])
    red -= np.minimum.reduceat(red, flat.offsets)[flat.item]
    delta = gap * DELTA_START
    while True:
        delta = min(delta, gap)
        stats["dp_runs"] += 1
        t_run = time.perf_counter()
        try:
            found = _threshold_dp(menus, flat, red, cap, lb + delta + tol, delta + tol, stats)
        except _WorkExceeded:
            return ExactResult(heur.pos, heur.cost, heur.error, lb, stats, proven=False)
        stats.setdefault("run_ms", []).append(round((time.perf_counter() - t_run) * 1e3, 2))
        if found is not None:
            pos, cost, error = found
            if error <= heur.error:
                return ExactResult(pos, cost, error, error, stats)
        if delta >= gap:
            # float noise only: the heuristic plan is optimal within the tolerance
            return ExactResult(heur.pos, heur.cost, heur.error, heur.error, stats)
        delta *= DELTA_GROWTH


def _threshold_dp(menus: list[Menu], flat: Flat, red: np.ndarray, cap: int, threshold: float,
                  delta: float, stats: dict) -> tuple[np.ndarray, int, float] | None:
    """Best plan with error <= threshold (None if there is none), options with reduced cost
    above `delta` removed."""
    alive = red <= delta
    counts = np.add.reduceat(alive.astype(np.int64), flat.offsets)
    pos = np.zeros(len(menus), np.int64)
    fixed = np.flatnonzero(counts == 1)
    kept = np.flatnonzero(alive)
    first_alive = kept[np.searchsorted(kept, flat.offsets)]
    pos[fixed] = flat.pos[first_alive[fixed]]
    fixed_cost = int(flat.cost[first_alive[fixed]].sum())
    fixed_err = float(flat.err[first_alive[fixed]].sum())
    multi = np.flatnonzero(counts > 1)
    # fewest options first keeps the state sets small while the bounds are loosest
    multi = multi[np.argsort(counts[multi], kind="stable")]
    sub = []
    for i in multi.tolist():
        s = slice(flat.offsets[i], flat.offsets[i] + len(menus[i]))
        k = np.flatnonzero(alive[s])
        sub.append(Menu(menus[i].cost[k], menus[i].err[k], k))
    stats["alive_options"] = int(alive.sum())
    stats["dp_items"] = len(sub)
    if fixed_cost > cap:
        return None
    res = _pareto_dp(sub, cap - fixed_cost, threshold - fixed_err, stats)
    if res is None:
        return None
    sub_pos, sub_cost, sub_err = res
    pos[multi] = [m.idx[p] for m, p in zip(sub, sub_pos, strict=True)]
    return pos, fixed_cost + sub_cost, fixed_err + sub_err


def _suffix_curves(menus: list[Menu]) -> list[tuple[np.ndarray, np.ndarray]]:
    """LP curves (bytes, error breakpoints) of menus[p:] for every p, from one slope sort."""
    n = len(menus)
    dc, de, owner, _ = hull_segments(menus)
    dc = dc.astype(np.float64)
    order = np.argsort(-(de / dc), kind="stable")
    dc, de, owner_a = dc[order], de[order], owner[order]
    first_c = np.array([float(m.cost[0]) for m in menus] + [0.0])
    first_e = np.array([float(m.err[0]) for m in menus] + [0.0])
    base_c = np.cumsum(first_c[::-1])[::-1]
    base_e = np.cumsum(first_e[::-1])[::-1]
    out = []
    for p in range(n + 1):
        mask = owner_a >= p
        out.append((base_c[p] + np.concatenate([[0.0], np.cumsum(dc[mask])]),
                    base_e[p] - np.concatenate([[0.0], np.cumsum(de[mask])])))
    return out


def _pareto_dp(menus: list[Menu], cap: int, threshold: float,
               stats: dict) -> tuple[list[int], int, float] | None:
    """Min-error plan with error <= threshold over `menus`, by bounded Pareto-set DP."""
    if not menus:
        return ([], 0, 0.0) if threshold >= 0 and cap >= 0 else None
    curves = _suffix_curves(menus)
    C = np.zeros(1, np.int64)
    E = np.zeros(1, np.float64)
    parents: list[np.ndarray] = []
    choices: list[np.ndarray] = []
    peak = 0
    for p, m in enumerate(menus):
        n_states = len(C)
        # option-major layout: K sorted runs, which the stable sort merges cheaply
        C2 = (m.cost[:, None] + C[None, :]).ravel()
        E2 = (m.err[:, None] + E[None, :]).ravel()
        room = (cap - C2).astype(np.float64)
        cc, ee = curves[p + 1]
        ok = room >= cc[0]
        ok[ok] = E2[ok] + np.interp(room[ok], cc, ee) <= threshold
        cand = np.flatnonzero(ok)
        stats["work"] += len(C2)
        if stats["work"] > stats["max_work"]:
            raise _WorkExceeded
        if len(cand) == 0:
            stats["peak_states"] = max(peak, stats.get("peak_states", 0))
            return None
        keep = cand[pareto_indices(C2[cand], E2[cand])]
        C, E = C2[keep], E2[keep]
        parents.append(keep % n_states)
        choices.append(keep // n_states)
        peak = max(peak, len(keep))
    stats["peak_states"] = max(peak, stats.get("peak_states", 0))
    state = len(C) - 1  # Pareto order: the last state has the least error
    pos = [0] * len(menus)
    for p in range(len(menus) - 1, -1, -1):
        pos[p] = int(choices[p][state])
        state = int(parents[p][state])
    return pos, int(C[-1]), float(E[-1])


def pareto_frontier(menus: list[Menu], max_points: int = 1_000_000
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Every Pareto-optimal (bytes, error) pair (Nemhauser & Ullmann 1969: merge one item at a
    time, drop dominated sums). Exact and complete, but the set can be huge for big models
    (hundreds of thousands of points for 196 linears x 40 options), hence `max_points`."""
    C = np.zeros(1, np.int64)
    E = np.zeros(1, np.float64)
    for m in sorted(menus, key=len):
        C2 = (C[:, None] + m.cost[None, :]).ravel()
        E2 = (E[:, None] + m.err[None, :]).ravel()
        keep = pareto_indices(C2, E2)
        if len(keep) > max_points:
            raise FrontierTooLarge(f"the complete Pareto frontier exceeds {max_points} points; "
                                   f"use the supported frontier or raise max_points")
        C, E = C2[keep], E2[keep]
    return C, E
