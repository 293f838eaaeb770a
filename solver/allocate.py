"""One entry point: `solve(problem, method)` -> Plan, and `frontier(problem)`."""

from __future__ import annotations

import time
from enum import Enum

import numpy as np

from solver.budget import format_bytes
from solver.dp import ExactResult, pareto_frontier, solve_exact
from solver.greedy import greedy
from solver.mckp import Menu
from solver.problem import AllocationProblem, Plan


class Method(str, Enum):
    EXACT = "exact"    # Lagrangian reduction + bounded Pareto DP: proven optimum
    CPSAT = "cpsat"    # OR-Tools CP-SAT on integer-scaled errors, with a time limit
    GREEDY = "greedy"  # LP rounding + greedy fill: fast, certified gap

    @classmethod
    def _missing_(cls, value: object) -> Method | None:
        if isinstance(value, str):  # case and whitespace insensitive: Method(" CPSAT ")
            for m in cls:
                if m.value == value.strip().lower():
                    return m
        return None

    @classmethod
    def parse(cls, value: Method | str) -> Method:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown method {value!r}; use one of "
                             f"{[m.value for m in cls]}") from None


def solve(problem: AllocationProblem, method: Method | str = Method.EXACT, *,
          time_limit_s: float = 10.0, workers: int = 0) -> Plan:
    """Best plan for the problem's budget (or the least-error plan when budget is None).

    Raises InfeasibleBudget (a ValueError carrying min_bytes/max_bytes) when the budget is below
    the cheapest plan, and ValueError when constraints leave a linear without options.
    `time_limit_s` and `workers` only apply to CP-SAT (also used by EXACT as a fallback on
    pathological menus where the DP exceeds its work limit; the plan then says whether CP-SAT
    proved it, with an honest gap, in `optimal`, `gap` and `info["fallback"]`).
    """
    method = Method.parse(method)
    t0 = time.perf_counter()
    problem.check_budget()
    menus = problem.menus
    info: dict = {}
    if problem.budget is None:
        pos = np.array([len(m) - 1 for m in menus], np.int64)
        optimal, gap, lb = True, 0.0, None
    else:
        cap = problem.budget - problem.fixed_bytes
        curve = problem.lp
        if method is Method.EXACT:
            res = solve_exact(menus, cap, curve)
            pos, optimal, gap, lb, info = res.pos, True, 0.0, res.lower_bound, res.stats
            if not res.proven:  # pathological menus: let CP-SAT try, report an honest gap
                pos, optimal, gap, lb, more = _cpsat_fallback(menus, cap, res, time_limit_s,
                                                              workers)
                info = {**info, **more}
        elif method is Method.GREEDY:
            heur = greedy(menus, cap, curve)
            pos, optimal, gap, lb = heur.pos, heur.gap <= 0.0, heur.gap, heur.lower_bound
        else:
            hint = greedy(menus, cap, curve).pos
            from solver.cpsat import solve_cpsat  # lazy: OR-Tools is heavy to import

            res = solve_cpsat(menus, cap, time_limit_s=time_limit_s, workers=workers, hint=hint)
            pos, optimal, gap, lb = res.pos, res.optimal, res.gap, res.lower_bound
            info = {"status": res.status, "cpsat_wall_s": res.wall_s}
    choice = [int(m.idx[p]) for m, p in zip(menus, pos.tolist(), strict=True)]
    solve_ms = (time.perf_counter() - t0) * 1e3
    plan = problem.plan_from_choice(choice, method=method.value, optimal=optimal, gap=gap,
                                    solve_ms=solve_ms, lower_bound=lb, info=info)
    if problem.budget is not None and plan.total_bytes > problem.budget:
        raise AssertionError(f"solver {method.value} overspent: {plan.total_bytes} > "
                             f"{problem.budget}")  # a bug, never an input error
    plan.notes += budget_notes(problem)
    return plan


def budget_notes(problem: AllocationProblem) -> list[str]:
    """A budget above the largest useful plan is not an error, but the user should know the
    extra bytes were not spent (and why)."""
    if problem.budget is None:
        return []
    top = problem.saturation_bytes()
    if problem.budget <= top:
        return []
    return [f"budget {problem.budget} bytes ({format_bytes(problem.budget)}) is above the "
            f"largest useful plan {top} bytes ({format_bytes(top)}): the plan uses {top} bytes "
            "(every linear at its best option); more bytes buy nothing"]


def _cpsat_fallback(menus: list[Menu], cap: int, res: ExactResult, time_limit_s: float,
                    workers: int) -> tuple[np.ndarray, bool, float, float, dict]:
    info: dict = {"fallback": "cpsat"}
    pos, error, lb, optimal = res.pos, res.error, res.lower_bound, False
    try:
        from solver.cpsat import solve_cpsat

        cp = solve_cpsat(menus, cap, time_limit_s=time_limit_s, workers=workers, hint=res.pos)
        info["status"] = cp.status
        lb = max(lb, cp.lower_bound)
        if cp.error < error:
            pos, error = cp.pos, cp.error
        optimal = cp.optimal and cp.error <= error
    except RuntimeError as exc:  # no CP-SAT plan in time: keep the heuristic one
        info["status"] = str(exc)
    gap = 0.0 if optimal else max(0.0, error - lb) / max(abs(error), 1e-300)
    return pos, optimal, gap, lb, info


def frontier(problem: AllocationProblem, *, complete: bool = False,
             max_points: int = 1_000_000) -> list[tuple[int, float]]:
    """Pareto frontier (total bytes incl. fixed, predicted error), bytes rising, error falling.

    Default: every *supported* Pareto point, i.e. each vertex of the lower convex hull of all
    plans, from one slope-sorted walk in O(N log N). Each point is an exactly optimal plan for
    its own byte count (no plan with as few bytes errs less). Between two neighbouring points
    the true optimum for a budget lies between the chord and the left point, i.e. within one
    linear's single step; `solve` gives it exactly.

    complete=True: every Pareto-optimal point, supported or not (Nemhauser-Ullmann merge).
    Exact, but sizes explode with model size (about 362k points for 196 linears x 40 options),
    so it raises FrontierTooLarge past `max_points`. The budget is ignored either way.
    """
    menus = problem.menus
    if complete:
        cost, err = pareto_frontier(menus, max_points=max_points)
    else:
        cost, err = problem.lp.cost, problem.lp.err
    fixed = problem.fixed_bytes
    return [(fixed + int(c), float(e)) for c, e in zip(cost.tolist(), err.tolist(), strict=True)]


def frontier_plan(problem: AllocationProblem, total_bytes: int) -> Plan:
    """The exact plan for one frontier point (same as solving at that budget)."""
    return solve(problem.with_budget(total_bytes), Method.EXACT)
