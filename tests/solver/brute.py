"""Brute force over every assignment of small problems (constraints and ties honoured)."""

from __future__ import annotations

import itertools

from solver.problem import AllocationProblem, _tie_groups


def all_plans(problem: AllocationProblem) -> list[tuple[int, float, tuple[int, ...]]]:
    """(total bytes, error, per-linear menu index) of every allowed assignment."""
    lins = problem.linears
    allowed = [problem.constraints.filter(lin.name, lin.options) for lin in lins]
    groups = _tie_groups([lin.name for lin in lins], problem.constraints.ties)
    pos = {lin.name: i for i, lin in enumerate(lins)}
    tied = [[pos[n] for n in g] for g in groups if len(g) > 1]
    out = []
    for ch in itertools.product(*allowed):
        if any(len({lins[i].options[ch[i]] for i in g}) > 1 for g in tied):
            continue
        cost = problem.fixed_bytes + sum(lin.costs[k] for lin, k in zip(lins, ch, strict=True))
        err = sum(lin.errors[k] for lin, k in zip(lins, ch, strict=True))
        out.append((cost, err, ch))
    return out


def best(problem: AllocationProblem) -> tuple[int, float] | None:
    """(bytes, error) of the least-error plan within the budget (fewest bytes among ties)."""
    plans = [(e, c) for c, e, _ in all_plans(problem)
             if problem.budget is None or c <= problem.budget]
    if not plans:
        return None
    e, c = min(plans)
    return c, e


def pareto(problem: AllocationProblem, tol: float = 1e-12) -> list[tuple[int, float]]:
    """Every Pareto-optimal (bytes, error) pair."""
    pts = sorted((c, e) for c, e, _ in all_plans(problem))
    out: list[tuple[int, float]] = []
    for c, e in pts:
        if not out or e < out[-1][1] - tol:
            if out and out[-1][0] == c:
                out.pop()
            out.append((c, e))
    return out
