"""The research note's hand-made allocations (its section 3), as plan generators at a budget.

The note ran everything at 3-bit Q with 4-bit factors and varied only the rank per block:
- uniform:    one rank everywhere (note: r=64);
- fidelity:   rank proportional to the block's sensitivity score;
- aggressive: rank proportional to the score squared (note: high r=100, low r=42);
- tiered:     3 tiers by score rank, 4/28 critical : 7/28 high : rest = 128 : 72 : 44;
- ultra:      top 2/28 : next 2/28 : rest = 256 : 128 : 40;
- extreme:    top 5/28 : rest = 128 : 32.
Generalised to any number of blocks, every strategy keeps its *shape* (relative ranks) and is
scaled by one factor s so the plan spends as much of the budget as it can without going over;
a final pass spends what is left by bumping single linears one rank up, most sensitive first.
Ranks come from each linear's own menu, so bytes are exact. Items outside the blocks (the
embedding, the head: absent from `block_of`) take the strategy's Q bits at their lowest rank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

from solver.budget import InfeasibleBudget
from solver.problem import AllocationProblem, Item, Plan

STRATEGIES = ("uniform", "fidelity", "aggressive", "tiered", "ultra", "extreme")

# (fraction of blocks, note rank) per tier, most sensitive first; the last tier is the rest
_TIERS: dict[str, list[tuple[float, float]]] = {
    "tiered": [(4 / 28, 128), (7 / 28, 72), (1.0, 44)],
    "ultra": [(2 / 28, 256), (2 / 28, 128), (1.0, 40)],
    "extreme": [(5 / 28, 128), (1.0, 32)],
}


def block_weights(name: str, scores: np.ndarray) -> np.ndarray:
    """Relative rank per block for strategy `name` (scale-free)."""
    n = len(scores)
    if name == "uniform":
        return np.ones(n)
    mean = float(np.mean(scores)) or 1.0
    if name == "fidelity":
        return np.maximum(scores, 0) / mean
    if name == "aggressive":
        return (np.maximum(scores, 0) / mean) ** 2
    if name in _TIERS:
        order = np.argsort(-scores, kind="stable")
        out = np.empty(n)
        start = 0
        for frac, rank in _TIERS[name]:
            size = n - start if frac >= 1.0 else min(n - start, max(1, math.ceil(frac * n)))
            out[order[start:start + size]] = rank
            start += size
        return out / 64.0
    raise ValueError(f"unknown strategy {name!r}; use one of {STRATEGIES}")


def _candidates(item: Item, q_bits: int, factor_bits: int,
                group_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ranks, costs, option index) the strategy may use for an item, rank ascending: the
    note's Q/factor bits where the menu has them, else the nearest Q bits it offers. One group
    size only (the note's format; default: that of the menu's first option) — the choice of
    group size per linear is the planner's, not the hand-made strategies'."""
    opts = item.options
    gs = group_size if group_size is not None else opts[0].group_size
    allowed = [k for k, o in enumerate(opts) if o.group_size == gs] or list(range(len(opts)))
    idx = [k for k in allowed if opts[k].bits == q_bits and opts[k].factor_bits == factor_bits]
    if not idx:
        idx = [k for k in allowed if opts[k].bits == q_bits]
    if not idx:
        nearest = min(abs(opts[k].bits - q_bits) for k in allowed)
        idx = [k for k in allowed if abs(opts[k].bits - q_bits) == nearest]
    best: dict[int, int] = {}  # rank -> cheapest option with that rank
    for k in idx:
        r = opts[k].rank
        if r not in best or item.costs[k] < item.costs[best[r]]:
            best[r] = k
    ranks = np.array(sorted(best), np.float64)
    ks = np.array([best[int(r)] for r in ranks], np.int64)
    return ranks, item.costs[ks], ks


def baseline(name: str, problem: AllocationProblem,
             block_scores: Mapping[int, float] | Sequence[float],
             block_of: Mapping[str, int], *, q_bits: int = 3, factor_bits: int = 4,
             group_size: int | None = None) -> Plan:
    """The note's strategy `name` scaled to the problem's budget (never above it)."""
    t0 = time.perf_counter()
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; use one of {STRATEGIES}")
    if problem.budget is None:
        raise ValueError("baselines need a budget to scale to")
    problem.check_budget()
    if isinstance(block_scores, Mapping):
        blocks = sorted(block_scores)
        scores = np.array([block_scores[b] for b in blocks], np.float64)
    else:
        blocks = list(range(len(block_scores)))
        scores = np.asarray(block_scores, np.float64)
    if len(scores) == 0 or not np.all(np.isfinite(scores)):
        raise ValueError("block_scores must be non-empty and finite")
    row = {b: i for i, b in enumerate(blocks)}
    weight_of_block = block_weights(name, scores)

    items = problem.items
    cands = [_candidates(it, q_bits, factor_bits, group_size) for it in items]
    weights = np.empty(len(items))
    for i, it in enumerate(items):
        inside = [n for n in it.names if n in block_of]
        missing = [n for n in inside if block_of[n] not in row]
        if missing:
            raise ValueError(f"no block score for {missing[0]} (block_of/block_scores)")
        weights[i] = (np.mean([weight_of_block[row[block_of[n]]] for n in inside])
                      if inside else 0.0)

    cap = problem.budget - problem.fixed_bytes

    def pick(s: float) -> list[int]:
        # largest menu rank at or below the target s * weight (the smallest if none is)
        return [max(0, int(np.searchsorted(r, s * w, side="right")) - 1)
                for (r, _, _), w in zip(cands, weights, strict=True)]

    def spend(sel: list[int]) -> int:
        return sum(int(c[k]) for (_, c, _), k in zip(cands, sel, strict=True))

    floor = spend([0] * len(items))
    if floor > cap:
        lo, hi = problem.feasibility()
        raise InfeasibleBudget(problem.budget, problem.fixed_bytes + floor, hi,
                               what=f"baseline {name} at {q_bits}-bit Q")
    # bytes only change where some target crosses a menu rank: search those breakpoints
    points = np.unique(np.concatenate(
        [[0.0]] + [r / w for (r, _, _), w in zip(cands, weights, strict=True) if w > 0]))
    lo_i, hi_i = 0, len(points) - 1
    while lo_i < hi_i:  # largest breakpoint that fits
        mid = (lo_i + hi_i + 1) // 2
        if spend(pick(points[mid])) <= cap:
            lo_i = mid
        else:
            hi_i = mid - 1
    scale = float(points[lo_i])
    sel = pick(scale)
    used = spend(sel)
    order = np.argsort(-weights, kind="stable").tolist()
    bumped = True
    while bumped:  # one rank step per linear per pass keeps the shape
        bumped = False
        for i in order:
            ranks, costs, _ = cands[i]
            if sel[i] + 1 < len(ranks) and used + int(costs[sel[i] + 1] - costs[sel[i]]) <= cap:
                used += int(costs[sel[i] + 1] - costs[sel[i]])
                sel[i] += 1
                bumped = True
    choice = [int(ks[k]) for (_, _, ks), k in zip(cands, sel, strict=True)]
    return problem.plan_from_choice(
        choice, method=f"baseline:{name}", optimal=False, gap=None,
        solve_ms=(time.perf_counter() - t0) * 1e3,
        info={"strategy": name, "scale": scale, "q_bits": q_bits, "factor_bits": factor_bits})


def all_baselines(problem: AllocationProblem, block_scores: Mapping[int, float] | Sequence[float],
                  block_of: Mapping[str, int], **kw: int) -> dict[str, Plan]:
    """Every strategy at the problem's budget, keyed by name."""
    return {name: baseline(name, problem, block_scores, block_of, **kw) for name in STRATEGIES}


Scores = Mapping[int, float] | Sequence[float]


def uniform(problem: AllocationProblem, scores: Scores, block_of: Mapping[str, int]) -> Plan:
    """One rank everywhere (the note's r=64), scaled to the budget."""
    return baseline("uniform", problem, scores, block_of)


def fidelity(problem: AllocationProblem, scores: Scores, block_of: Mapping[str, int]) -> Plan:
    """Rank proportional to block sensitivity."""
    return baseline("fidelity", problem, scores, block_of)


def aggressive(problem: AllocationProblem, scores: Scores, block_of: Mapping[str, int]) -> Plan:
    """Rank proportional to sensitivity squared."""
    return baseline("aggressive", problem, scores, block_of)


def tiered(problem: AllocationProblem, scores: Scores, block_of: Mapping[str, int]) -> Plan:
    """Critical/high/low tiers at 128:72:44."""
    return baseline("tiered", problem, scores, block_of)


def ultra(problem: AllocationProblem, scores: Scores, block_of: Mapping[str, int]) -> Plan:
    """Top 2/28 : next 2/28 : rest at 256:128:40 (the note's best)."""
    return baseline("ultra", problem, scores, block_of)


def extreme(problem: AllocationProblem, scores: Scores, block_of: Mapping[str, int]) -> Plan:
    """Top 5/28 : rest at 128:32."""
    return baseline("extreme", problem, scores, block_of)
