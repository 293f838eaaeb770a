"""The Plan a solver returns: one option per linear, exact bytes, predicted error, notes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from solver.bytes import Option


@dataclass
class Plan:
    """One option per linear, with exact bytes (fixed included) and the predicted error."""

    assignments: dict[str, Option]
    total_bytes: int
    predicted_error: float
    method: str
    optimal: bool
    gap: float | None = None
    solve_ms: float = 0.0
    budget: int | None = None
    fixed_bytes: int = 0
    lower_bound: float | None = None
    linear_bytes: dict[str, int] = field(default_factory=dict)
    linear_errors: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # what the user should know, in words

    def bits_per_param(self, params: int) -> float:
        """Average stored bits per parameter: every stored byte over the model's `params`
        parameters (`BudgetBasis.params`), the figure a bpp budget caps."""
        return 8 * self.total_bytes / params

    def to_dict(self) -> dict[str, Any]:
        return {
            "assignments": {n: o.to_dict() for n, o in self.assignments.items()},
            "total_bytes": self.total_bytes, "predicted_error": self.predicted_error,
            "method": self.method, "optimal": self.optimal, "gap": self.gap,
            "solve_ms": self.solve_ms, "budget": self.budget, "fixed_bytes": self.fixed_bytes,
            "lower_bound": self.lower_bound, "linear_bytes": dict(self.linear_bytes),
            "linear_errors": dict(self.linear_errors), "info": dict(self.info),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        return cls(
            assignments={n: Option.from_dict(o) for n, o in d["assignments"].items()},
            total_bytes=int(d["total_bytes"]), predicted_error=float(d["predicted_error"]),
            method=str(d["method"]), optimal=bool(d["optimal"]), gap=d.get("gap"),
            solve_ms=float(d.get("solve_ms", 0.0)), budget=d.get("budget"),
            fixed_bytes=int(d.get("fixed_bytes", 0)), lower_bound=d.get("lower_bound"),
            linear_bytes={k: int(v) for k, v in d.get("linear_bytes", {}).items()},
            linear_errors={k: float(v) for k, v in d.get("linear_errors", {}).items()},
            info=dict(d.get("info", {})), notes=[str(n) for n in d.get("notes") or []],
        )
