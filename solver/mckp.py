"""Multiple-choice knapsack primitives shared by the exact, greedy and frontier solvers.

Problem: items i with options (c_io bytes, e_io error); pick one option per item minimising
Σ e subject to Σ c ≤ cap. Everything here works on *menus*: an item's options with dominated
ones removed (Sinha & Zoltners 1979: an option costing more and erring no less is never needed),
sorted by cost, so errors strictly fall as bytes rise.

The LP relaxation of MCKP is solved by the classic greedy over convex-hull segments
(Sinha & Zoltners 1979; Dyer 1984; Zemel 1984): take each item's lower convex hull, sort all hull
segments by slope (error saved per byte), and walk them. Every vertex of that walk is an integer
plan that is exactly optimal for its own byte count (a *supported* Pareto point), and the walk's
piecewise-linear curve is the LP bound for every capacity at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Menu:
    """An item's non-dominated options: cost strictly rising, err strictly falling."""

    cost: np.ndarray  # int64
    err: np.ndarray   # float64
    idx: np.ndarray   # int64, position of each kept option in the item's own option list

    def __len__(self) -> int:
        return len(self.cost)


def pareto_indices(cost: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Indices of the Pareto-minimal (cost, err) points, by cost ascending (err then falls
    strictly). Equal points keep the first; deterministic."""
    n = len(cost)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(cost, kind="stable")
    c, e = cost[order], err[order]
    keep = np.empty(n, bool)
    keep[0] = True
    if n > 1:
        keep[1:] = e[1:] < np.minimum.accumulate(e)[:-1]
    k = np.flatnonzero(keep)
    # among kept points with the same cost the last is the best (errors fall strictly)
    same = c[k[:-1]] == c[k[1:]]
    if same.any():
        k = k[np.append(~same, True)]
    return order[k]


def pareto_menu(cost: np.ndarray, err: np.ndarray) -> Menu:
    cost = np.asarray(cost, np.int64)
    err = np.asarray(err, np.float64)
    k = pareto_indices(cost, err)
    return Menu(cost[k], err[k], k)


@dataclass(frozen=True)
class LPCurve:
    """The parametric LP walk over hull segments, sorted by slope (steepest first).

    Vertex k (k segments taken) is an integer plan with bytes ``cost[k]`` and error ``err[k]``.
    """

    cost: np.ndarray      # int64, len S+1, rising
    err: np.ndarray       # float64, len S+1, falling
    slope: np.ndarray     # float64, len S, error saved per byte, non-increasing
    seg_item: np.ndarray  # int64, len S, which item the segment moves
    seg_to: np.ndarray    # int64, len S, the menu position the item moves to
    n_items: int

    def vertex(self, k: int) -> np.ndarray:
        """Menu position per item at vertex k."""
        pos = np.zeros(self.n_items, np.int64)
        np.maximum.at(pos, self.seg_item[:k], self.seg_to[:k])
        return pos

    def at(self, cap: int) -> tuple[int, float, float]:
        """(j, lam, lp) for capacity `cap` >= cost[0]: j = last vertex that fits, lam = the
        critical slope (Lagrange multiplier, 0 when everything fits), lp = LP optimum."""
        j = int(np.searchsorted(self.cost, cap, side="right")) - 1
        if j >= len(self.slope):
            return j, 0.0, float(self.err[-1])
        lam = float(self.slope[j])
        return j, lam, float(self.err[j] - (cap - int(self.cost[j])) * lam)

    def bound(self, room: np.ndarray) -> np.ndarray:
        """LP lower bound on the error for each capacity in `room` (>= cost[0])."""
        return np.interp(room, self.cost, self.err)


def pareto_menus(costs: list[np.ndarray], errs: list[np.ndarray]) -> list[Menu]:
    """pareto_menu for many items at once (padded to one 2-D array, one sort for all)."""
    n = len(costs)
    width = max(len(c) for c in costs)
    C = np.full((n, width), np.iinfo(np.int64).max, np.int64)
    E = np.full((n, width), np.inf)
    for i, (c, e) in enumerate(zip(costs, errs, strict=True)):
        C[i, :len(c)] = c
        E[i, :len(e)] = e
    # sort rows by (cost, err): stable sort by err, then stable sort by cost
    o1 = np.argsort(E, axis=1, kind="stable")
    o2 = np.argsort(np.take_along_axis(C, o1, 1), axis=1, kind="stable")
    order = np.take_along_axis(o1, o2, 1)
    Cs = np.take_along_axis(C, order, 1)
    Es = np.take_along_axis(E, order, 1)
    keep = np.zeros_like(Es, dtype=bool)
    keep[:, 0] = True
    if width > 1:
        keep[:, 1:] = Es[:, 1:] < np.minimum.accumulate(Es, axis=1)[:, :-1]
    menus = []
    for i in range(n):
        k = keep[i]
        menus.append(Menu(Cs[i, k], Es[i, k], order[i, k]))
    return menus


def hull_segments(menus: list[Menu]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lower convex hull of every menu at once, as segments (dc, de, item, to): item moves to
    menu position `to`, spending dc bytes to save de error. Points strictly above or on a chord
    of two others are never hull vertices, so all such points are dropped in parallel until
    every consecutive triple turns convex (the same hull as Andrew's monotone chain)."""
    c = np.concatenate([m.cost for m in menus]).astype(np.float64)
    e = np.concatenate([m.err for m in menus])
    sizes = [len(m) for m in menus]
    item = np.repeat(np.arange(len(menus)), sizes)
    pos = np.concatenate([np.arange(s) for s in sizes])
    while len(c) >= 3:
        same = item[:-2] == item[2:]
        above = (e[1:-1] - e[:-2]) * (c[2:] - c[:-2]) >= (e[2:] - e[:-2]) * (c[1:-1] - c[:-2])
        drop = same & above
        if not drop.any():
            break
        keep = np.ones(len(c), bool)
        keep[1:-1] = ~drop
        c, e, item, pos = c[keep], e[keep], item[keep], pos[keep]
    seg = np.flatnonzero(item[:-1] == item[1:])
    dc = (c[seg + 1] - c[seg]).round().astype(np.int64)
    return dc, e[seg] - e[seg + 1], item[seg + 1], pos[seg + 1]


def lp_curve(menus: list[Menu]) -> LPCurve:
    dc, de, items, tos = hull_segments(menus)
    base_c = sum(int(m.cost[0]) for m in menus)
    base_e = float(sum(m.err[0] for m in menus))
    slope = de / dc
    order = np.argsort(-slope, kind="stable")  # stable keeps each item's own segments in order
    dc, de, slope = dc[order], de[order], slope[order]
    cost = base_c + np.concatenate([[0], np.cumsum(dc)]).astype(np.int64)
    err = base_e - np.concatenate([[0.0], np.cumsum(de)])
    return LPCurve(cost, err, slope, items[order], tos[order], len(menus))


@dataclass(frozen=True)
class Flat:
    """All menus concatenated, for vectorised passes over every option at once."""

    cost: np.ndarray
    err: np.ndarray
    item: np.ndarray    # item of each entry
    pos: np.ndarray     # menu position of each entry
    offsets: np.ndarray  # start of each item's block

    @classmethod
    def of(cls, menus: list[Menu]) -> Flat:
        sizes = np.array([len(m) for m in menus], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return cls(np.concatenate([m.cost for m in menus]),
                   np.concatenate([m.err for m in menus]),
                   np.repeat(np.arange(len(menus)), sizes),
                   np.concatenate([np.arange(s) for s in sizes]).astype(np.int64), offsets)


def totals(menus: list[Menu], pos: np.ndarray) -> tuple[int, float]:
    """(bytes, error) of one menu position per item."""
    c = sum(int(m.cost[p]) for m, p in zip(menus, pos.tolist(), strict=True))
    e = float(sum(m.err[p] for m, p in zip(menus, pos.tolist(), strict=True)))
    return c, e


def error_scale(menus: list[Menu]) -> float:
    """Magnitude of the objective, for relative float tolerances."""
    return float(sum(max(abs(m.err[0]), abs(m.err[-1])) for m in menus)) or 1.0
