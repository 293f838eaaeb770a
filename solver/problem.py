"""The allocation problem: per-linear menus of (option, exact bytes, predicted error), fixed
bytes, a byte budget and constraints (solver.constraints); the Plan lives in solver.plan.

Constraints and ties are resolved once into *items*: an item is one linear, or a group of tied
linears merged into a super-item whose options are the ones every member allows, with summed
bytes and errors. Solvers only ever see items, so ties cost nothing extra.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from solver.budget import BudgetBasis, BudgetError, InfeasibleBudget, format_bytes, parse_budget
from solver.bytes import Option, option_bytes
from solver.constraints import Constraints, describe_options
from solver.ct_schemes import FUSED
from solver.mckp import LPCurve, Menu, lp_curve, pareto_menus
from solver.plan import Plan

__all__ = ["AllocationProblem", "BudgetError", "Constraints", "InfeasibleBudget", "Item",
           "LinearMenu", "Plan", "parse_budget"]


@dataclass
class LinearMenu:
    """The options one linear may take, each with exact bytes and a predicted error."""

    name: str
    out_features: int
    in_features: int
    options: list[Option]
    costs: list[int] | None = None
    errors: list[float] | None = None

    def __post_init__(self) -> None:
        if self.out_features < 1 or self.in_features < 1:
            raise ValueError(f"{self.name}: shape must be positive, "
                             f"got {self.out_features}x{self.in_features}")
        self.options = list(self.options)
        if not self.options:
            raise ValueError(f"{self.name}: empty menu")
        if len(set(self.options)) != len(self.options):
            raise ValueError(f"{self.name}: an option is listed twice")
        if self.costs is None:
            self.costs = [option_bytes(self.out_features, self.in_features, o)
                          for o in self.options]
        if self.errors is None:
            raise ValueError(f"{self.name}: errors are required (one per option)")
        self.costs = [int(c) for c in self.costs]
        self.errors = [float(e) for e in self.errors]
        if not (len(self.costs) == len(self.errors) == len(self.options)):
            raise ValueError(f"{self.name}: {len(self.options)} options, {len(self.costs)} "
                             f"costs and {len(self.errors)} errors must match")
        if any(c < 0 for c in self.costs):
            raise ValueError(f"{self.name}: costs must be >= 0")
        if not all(math.isfinite(e) for e in self.errors):
            raise ValueError(f"{self.name}: errors must be finite")

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    @cached_property
    def cost_array(self) -> np.ndarray:
        return np.asarray(self.costs, np.int64)

    @cached_property
    def error_array(self) -> np.ndarray:
        return np.asarray(self.errors, np.float64)

    @cached_property
    def index(self) -> dict[Option, int]:
        """Option -> its position in this menu."""
        return {o: k for k, o in enumerate(self.options)}


@dataclass(frozen=True)
class Item:
    """What solvers see: one linear or a tied group, with its allowed options."""

    names: tuple[str, ...]
    options: tuple[Option, ...]
    costs: np.ndarray   # int64, summed over members
    errors: np.ndarray  # float64, summed over members
    picks: np.ndarray   # [member, option] -> that member's own menu index


class AllocationProblem:
    """min Σ error  s.t.  Σ bytes + fixed_bytes ≤ budget, one option per linear, constraints."""

    def __init__(self, linears: Sequence[LinearMenu], fixed_bytes: int = 0,
                 budget: int | None = None, constraints: Constraints | None = None,
                 fp16_bytes: int | None = None) -> None:
        """`fp16_bytes`: the model's `fp16_reference_bytes` (the ``x`` budget reference); when
        None, the linears at fp16 plus the fixed bytes (exact for a model stored in fp16)."""
        self.constraints = constraints or Constraints()
        # menus are quantized; a linear the rules keep dense gets the fp16 option as well
        self.linears = [_with_dense(lin, self.constraints) for lin in linears]
        if not self.linears:
            raise ValueError("a problem needs at least one linear")
        names = [lin.name for lin in self.linears]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate linear names: {dup[:5]}")
        if int(fixed_bytes) != fixed_bytes or fixed_bytes < 0:
            raise ValueError(f"fixed_bytes must be a non-negative integer, got {fixed_bytes!r}")
        if budget is not None and (isinstance(budget, bool) or int(budget) != budget
                                   or budget <= 0):
            raise BudgetError(f"budget must be a positive integer of bytes or None, "
                              f"got {budget!r} (parse strings with parse_budget)")
        self.fixed_bytes = int(fixed_bytes)
        self.fp16_bytes = int(fp16_bytes) if fp16_bytes is not None else \
            2 * sum(lin.params for lin in self.linears) + self.fixed_bytes
        self.budget = None if budget is None else int(budget)
        self.by_name = {lin.name: lin for lin in self.linears}
        # budget-free derived data (items, menus, LP walk), shared by every with_budget copy
        # so a cached budget-less problem pays for it once; races only duplicate work
        self._shared: dict[str, Any] = {}

    def _derived(self, key: str, build: Any) -> Any:
        value = self._shared.get(key)
        if value is None:
            value = self._shared[key] = build()
        return value

    # -- derived data -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [lin.name for lin in self.linears]

    @property
    def total_linear_params(self) -> int:
        return sum(lin.params for lin in self.linears)

    def with_budget(self, budget: int | str | None) -> AllocationProblem:
        """The same problem (sharing resolved items) at another budget."""
        out = AllocationProblem.__new__(AllocationProblem)
        out.__dict__.update(self.__dict__)
        out.budget = None if budget is None else self.parse_budget(budget)
        return out

    @property
    def basis(self) -> BudgetBasis:
        return BudgetBasis(self.total_linear_params, self.fixed_bytes, self.fp16_bytes)

    def parse_budget(self, text_or_int: str | int) -> int:
        """A budget in bytes against this problem's `basis` (the model's one reference)."""
        return self.basis.parse(text_or_int)

    @property
    def items(self) -> list[Item]:
        """Constraints applied and ties merged; raises ValueError on impossible constraints."""
        return self._derived("items", self._resolve)

    def _resolve(self) -> list[Item]:
        cons = self.constraints
        names = self.names
        for fld, glob in cons.globs():
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise ValueError(f"constraint {fld} glob {glob!r} matches no linear")
        allowed: dict[str, list[int]] = {}
        for lin in self.linears:
            keep = cons.filter(lin.name, lin.options)
            if not keep:
                rules = "; ".join(cons.rules_for(lin.name))
                raise ValueError(f"constraints leave no option for {lin.name} ({rules}); "
                                 f"{describe_options(lin.options)}")
            allowed[lin.name] = keep
        groups = _tie_groups(names, cons.ties)
        items = []
        for group in groups:
            items.append(self._merge(group, allowed))
        return items

    @property
    def menus(self) -> list[Menu]:
        """Dominance-pruned menus of the items (what the solvers work on)."""
        items = self.items
        return self._derived("menus", lambda: pareto_menus([it.costs for it in items],
                                                           [it.errors for it in items]))

    @property
    def lp(self) -> LPCurve:
        """The LP relaxation walk over all menus (supported frontier, bounds)."""
        return self._derived("lp", lambda: lp_curve(self.menus))

    def _merge(self, group: list[str], allowed: dict[str, list[int]]) -> Item:
        first = self.by_name[group[0]]
        if len(group) == 1:  # the common case: no hashing of options
            ks = allowed[first.name]
            keep = np.asarray(ks, np.int64)
            if len(ks) == len(first.options):
                return Item((first.name,), tuple(first.options), first.cost_array,
                            first.error_array, keep[None, :])
            return Item((first.name,), tuple(first.options[k] for k in ks),
                        first.cost_array[keep], first.error_array[keep], keep[None, :])
        shared = [first.options[k] for k in allowed[first.name]]
        for name in group[1:]:
            lin = self.by_name[name]
            mine = {lin.options[k] for k in allowed[name]}
            shared = [o for o in shared if o in mine]
        if not shared:
            raise ValueError(f"tied linears {group[:4]}{'...' if len(group) > 4 else ''} "
                             f"have no allowed option in common")
        costs = np.zeros(len(shared), np.int64)
        errors = np.zeros(len(shared), np.float64)
        picks = np.zeros((len(group), len(shared)), np.int64)
        for m, name in enumerate(group):
            lin = self.by_name[name]
            picks[m] = [lin.index[o] for o in shared]
            costs += lin.cost_array[picks[m]]
            errors += lin.error_array[picks[m]]
        return Item(tuple(group), tuple(shared), costs, errors, picks)

    def feasibility(self) -> tuple[int, int]:
        """(min_bytes, max_bytes) any plan can have, fixed bytes included."""
        lo = sum(int(it.costs.min()) for it in self.items)
        hi = sum(int(it.costs.max()) for it in self.items)
        return self.fixed_bytes + lo, self.fixed_bytes + hi

    def saturation_bytes(self) -> int:
        """Bytes of the least-error plan (cheapest among ties): more budget buys nothing."""
        total = self.fixed_bytes
        for it in self.items:
            best = np.flatnonzero(it.errors == it.errors.min())
            total += int(it.costs[best].min())
        return total

    def check_budget(self, budget: int | None = None) -> None:
        """Raise InfeasibleBudget when the budget is below the minimum feasible bytes."""
        budget = self.budget if budget is None else budget
        if budget is None:
            return
        lo, hi = self.feasibility()
        if budget < lo:
            raise InfeasibleBudget(budget, lo, hi)

    def plan_from_choice(self, choice: Sequence[int], **meta: Any) -> Plan:
        """Build a Plan from one option index per item (indices into Item.options)."""
        assignments: dict[str, Option] = {}
        lin_bytes: dict[str, int] = {}
        lin_errors: dict[str, float] = {}
        for it, k in zip(self.items, choice, strict=True):
            opt = it.options[k]
            for name, j in zip(it.names, it.picks[:, k].tolist(), strict=True):
                lin = self.by_name[name]
                assignments[name] = opt
                lin_bytes[name] = lin.costs[j]
                lin_errors[name] = lin.errors[j]
        ordered = {n: assignments[n] for n in self.names}
        total = self.fixed_bytes + sum(lin_bytes.values())
        return Plan(assignments=ordered, total_bytes=total,
                    predicted_error=float(sum(lin_errors[n] for n in self.names)),
                    budget=self.budget, fixed_bytes=self.fixed_bytes,
                    linear_bytes={n: lin_bytes[n] for n in self.names},
                    linear_errors={n: lin_errors[n] for n in self.names}, **meta)

    def evaluate(self, assignments: Mapping[str, Option]) -> tuple[int, float]:
        """(total bytes, predicted error) of any full assignment; KeyError if not on a menu."""
        total, err = self.fixed_bytes, 0.0
        for lin in self.linears:
            j = lin.index[assignments[lin.name]]
            total += lin.costs[j]
            err += lin.errors[j]
        return total, err

    def __repr__(self) -> str:
        budget = "none" if self.budget is None else format_bytes(self.budget)
        return (f"AllocationProblem({len(self.linears)} linears, {len(self.items)} items, "
                f"fixed={format_bytes(self.fixed_bytes)}, budget={budget})")


def _tie_groups(names: list[str], ties: Sequence[Sequence[str]]) -> list[list[str]]:
    """Union-find over tie groups; every linear ends in exactly one group, in model order."""
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for group in ties:
        members = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in group)]
        for other in members[1:]:
            parent[root(other)] = root(members[0])
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(root(n), []).append(n)
    return list(out.values())


def tie_per_block(names: Sequence[str], suffixes: Sequence[str] = (
        "q_proj", "k_proj", "v_proj")) -> list[list[str]]:
    """Tie groups for linears reading the same input in each block, e.g. q/k/v per layer."""
    groups: dict[str, list[str]] = {}
    for n in names:
        head, _, last = n.rpartition(".")
        if last in suffixes:
            groups.setdefault(head, []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def fused_groups(names: Sequence[str]) -> list[list[str]]:
    """The modules vLLM fuses (ct_schemes.FUSED: q/k/v, gate/up), one tie group per parent."""
    return [g for suffixes in FUSED for g in tie_per_block(names, suffixes)]


def _with_dense(lin: LinearMenu, cons: Constraints) -> LinearMenu:
    """`lin` plus the fp16 option its rules ask for. Its error is 0: the weight is stored as
    is, and the error models measure damage relative to the fp16 model."""
    opt = cons.dense_option(lin.name, lin.options[0])
    if opt is None or opt in lin.index:
        return lin
    return LinearMenu(lin.name, lin.out_features, lin.in_features, [*lin.options, opt],
                      [*lin.costs, option_bytes(lin.out_features, lin.in_features, opt)],
                      [*lin.errors, 0.0])
