"""Request checks that need the model's layer inventory but no profile: absurd or infeasible
budgets (naming the minimum) and solver constraints (types, ranges, globs that match nothing).

They run when a plan is requested, so bad input is a 422 at once rather than a failed job later.
With a profile the solver's own check (service.pipeline.check_budget) covers the same ground.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from solver.budget import BudgetError, InfeasibleBudget
from solver.bytes import FP16_BITS, MAX_BITS, MIN_BITS

# 1 PiB: larger than any model we could load; anything above is a typo, not a budget (and would
# overflow a 64-bit column further up).
MAX_BUDGET_BYTES = 2 ** 50
MAX_RANK = 1 << 16
MAX_GROUP_SIZE = 1 << 16
CONSTRAINT_KEYS = ("min_bits", "max_bits", "pinned", "allowed_ranks", "ties")
OPTION_FIELDS = ("bits", "rank", "factor_bits", "group_size", "symmetric")


class ConstraintError(ValueError):
    """Constraints the solver cannot use; the message says which field and why."""


def check_budget_bytes(budget_bytes: int, inventory: dict | None, budget: Any) -> None:
    """Absurdly large budgets, and (given the inventory) budgets below its minimum (every linear
    at 2 bits without correction), fail with the numbers."""
    from service.pipeline import inventory_feasibility

    if budget_bytes > MAX_BUDGET_BYTES:
        raise BudgetError(f"budget {budget!r} is over the 1 PiB ({MAX_BUDGET_BYTES} byte) limit")
    if inventory is None:
        return
    lo, hi = inventory_feasibility(inventory)
    if budget_bytes < lo:
        raise InfeasibleBudget(budget_bytes, lo, hi)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bits(v: Any, where: str) -> None:
    if not _is_int(v) or not (MIN_BITS <= v <= MAX_BITS or v == FP16_BITS):
        raise ConstraintError(f"{where} must be an integer in {MIN_BITS}..{MAX_BITS} or "
                              f"{FP16_BITS}, got {v!r}")


def _rank(v: Any, where: str) -> None:
    if not _is_int(v) or not 0 <= v <= MAX_RANK:
        raise ConstraintError(f"{where} must be an integer in 0..{MAX_RANK}, got {v!r}")


def _glob_map(value: Any, field: str) -> dict[str, Any]:
    """An int/collection for every linear, or a mapping glob -> value (as the solver takes it)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        for g in value:
            if not isinstance(g, str) or not g:
                raise ConstraintError(f"{field}: globs must be non-empty strings, got {g!r}")
        return dict(value)
    return {"*": value}


def _pin(pin: Any, where: str) -> None:
    if not isinstance(pin, Mapping):
        raise ConstraintError(f"{where} must be a mapping of option fields, got {pin!r}")
    unknown = set(pin) - set(OPTION_FIELDS)
    if unknown:
        raise ConstraintError(f"{where}: unknown option fields {sorted(unknown)} "
                              f"(known: {', '.join(OPTION_FIELDS)})")
    for k in ("bits", "factor_bits"):
        if k in pin:
            _bits(pin[k], f"{where}.{k}")
    if "rank" in pin:
        _rank(pin["rank"], f"{where}.rank")
    if "group_size" in pin:
        gs = pin["group_size"]
        if not _is_int(gs) or not 1 <= gs <= MAX_GROUP_SIZE:
            raise ConstraintError(f"{where}.group_size must be an integer in "
                                  f"1..{MAX_GROUP_SIZE}, got {gs!r}")
    if "symmetric" in pin and not isinstance(pin["symmetric"], bool):
        raise ConstraintError(f"{where}.symmetric must be true or false")


def check_constraints(constraints: Mapping[str, Any] | None, linear_names: Sequence[str]) -> None:
    """Raise ConstraintError for anything the solver would reject or misread."""
    if not constraints:
        return
    if not isinstance(constraints, Mapping):
        raise ConstraintError("constraints must be an object")
    unknown = set(constraints) - set(CONSTRAINT_KEYS)
    if unknown:
        raise ConstraintError(f"unknown constraint keys {sorted(unknown)} "
                              f"(known: {', '.join(CONSTRAINT_KEYS)})")
    globs: list[tuple[str, str]] = []
    bounds: dict[str, dict[str, Any]] = {}
    for field in ("min_bits", "max_bits"):
        bounds[field] = _glob_map(constraints.get(field), field)
        for g, v in bounds[field].items():
            _bits(v, f"{field}[{g!r}]" if g != "*" else field)
            globs.append((field, g))
    for g, lo in bounds["min_bits"].items():
        hi = bounds["max_bits"].get(g)
        if hi is not None and lo > hi:
            raise ConstraintError(f"min_bits {lo} > max_bits {hi} for {g!r}")
    ranks = constraints.get("allowed_ranks")
    for g, v in _glob_map(ranks, "allowed_ranks").items():
        if isinstance(v, str | bytes | Mapping) or not isinstance(v, Sequence | set | frozenset):
            raise ConstraintError(f"allowed_ranks must be a list of ranks, got {v!r}")
        if not v:
            raise ConstraintError("allowed_ranks must not be empty")
        for r in v:
            _rank(r, "allowed_ranks")
        globs.append(("allowed_ranks", g))
    pinned = constraints.get("pinned") or {}
    if not isinstance(pinned, Mapping):
        raise ConstraintError("pinned must be a mapping of glob -> option fields")
    for g, pin in _glob_map(pinned, "pinned").items():
        _pin(pin, f"pinned[{g!r}]")
        globs.append(("pinned", g))
    ties = constraints.get("ties") or []
    if not isinstance(ties, list):
        raise ConstraintError("ties must be a list of glob groups")
    if ties and all(isinstance(t, str) for t in ties):
        ties = [ties]
    for group in ties:
        if not isinstance(group, list) or not all(isinstance(t, str) and t for t in group):
            raise ConstraintError(f"ties: each group is a list of globs, got {group!r}")
        globs += [("ties", g) for g in group]
    for field, g in globs:
        if not any(fnmatch.fnmatchcase(n, g) for n in linear_names):
            raise ConstraintError(f"constraint {field} glob {g!r} matches no linear")


def inventory_names(inventory: dict) -> list[str]:
    return [str(li["name"]) for li in inventory.get("linears", [])]
