"""The same MCKP as a CP-SAT model (OR-Tools): a reference to check the exact solver against
and a fallback with a time limit.

CP-SAT needs integer coefficients, so errors are scaled: per item the least error is moved to a
constant offset and the rest scaled so the whole objective range spans `resolution` units. The
rounding can move the objective by at most n/2 units; `optimal` means optimal for the scaled
objective. Costs are shifted by each item's cheapest option and divided by their gcd, which is
exact and keeps the coefficients small.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from solver.mckp import Menu, totals


@dataclass(frozen=True)
class CpsatResult:
    pos: np.ndarray
    cost: int
    error: float
    lower_bound: float   # CP-SAT's proven bound, unscaled
    optimal: bool        # proven optimal for the scaled objective
    gap: float           # (objective - bound) / objective, in true units
    status: str
    wall_s: float


def solve_cpsat(menus: list[Menu], cap: int, *, time_limit_s: float = 10.0,
                workers: int = 0, hint: np.ndarray | None = None,
                resolution: float = 1e9) -> CpsatResult:
    """Solve with CP-SAT. `hint` (menu positions) seeds the search; `workers` 0 = all cores."""
    base_e = np.array([m.err[-1] for m in menus])  # least error of each item
    span = float(sum(m.err[0] - m.err[-1] for m in menus))
    scale = resolution / span if span > 0 else 1.0
    base_c = np.array([int(m.cost[0]) for m in menus], np.int64)
    diffs = np.concatenate([m.cost - m.cost[0] for m in menus])
    g = int(np.gcd.reduce(diffs[diffs > 0])) if (diffs > 0).any() else 1
    room = (cap - int(base_c.sum())) // g

    model = cp_model.CpModel()
    xs: list[list[cp_model.IntVar]] = []
    obj, weight = [], []
    for i, m in enumerate(menus):
        row = [model.NewBoolVar(f"x{i}_{k}") for k in range(len(m))]
        model.AddExactlyOne(row)
        xs.append(row)
        sc = np.rint((m.err - base_e[i]) * scale).astype(np.int64).tolist()
        dc = ((m.cost - m.cost[0]) // g).tolist()
        for k, x in enumerate(row):
            if sc[k]:
                obj.append((x, sc[k]))
            if dc[k]:
                weight.append((x, dc[k]))
    model.Add(sum(c * x for x, c in weight) <= room)
    model.Minimize(sum(c * x for x, c in obj))
    if hint is not None:
        for row, p in zip(xs, hint.tolist(), strict=True):
            for k, x in enumerate(row):
                model.AddHint(x, k == p)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = int(workers) or min(8, os.cpu_count() or 1)
    status = solver.Solve(model)
    name = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"CP-SAT found no plan within {time_limit_s}s (status {name})")
    pos = np.array([next(k for k, x in enumerate(row) if solver.Value(x)) for row in xs],
                   np.int64)
    cost, error = totals(menus, pos)
    offset = float(base_e.sum())
    bound = offset + solver.BestObjectiveBound() / scale
    objective = offset + solver.ObjectiveValue() / scale
    gap = max(0.0, objective - bound) / max(abs(objective), 1e-300)
    return CpsatResult(pos, cost, error, min(bound, error), status == cp_model.OPTIMAL,
                       0.0 if status == cp_model.OPTIMAL else gap, name, solver.WallTime())


def rounding_slack(menus: list[Menu], resolution: float = 1e9) -> float:
    """Largest amount the scaled objective's rounding can misstate a plan's true error."""
    span = float(sum(m.err[0] - m.err[-1] for m in menus))
    return math.ceil(len(menus) / 2) * (span / resolution if span > 0 else 0.0)
