"""What the dashboard's templates show, computed from the JSON API's own responses: byte sizes
in readable units, the feasible budget range in every unit a budget accepts, and the per-layer
heatmap (blocks × linear kinds, coloured by bits)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from service.jobs import planning
from solver.budget import format_bytes

_BLOCK = re.compile(r"^(?P<pre>.*?)\.(?P<block>\d+)\.(?P<kind>.+)$")


def human_bytes(n: int | float | None) -> str:
    return "—" if n is None else format_bytes(n)


@dataclass(frozen=True)
class BudgetRange:
    """The smallest and largest plan of a model, in bytes, bits per parameter and x fp16."""

    min_bytes: int
    max_bytes: int
    min_bpp: float
    max_bpp: float
    min_x: float
    max_x: float
    source: str


def budget_range(inventory: dict, min_bytes: int, max_bytes: int, source: str) -> BudgetRange:
    """The same basis the budget parse uses (planning.inventory_basis), inverted."""
    basis = planning.inventory_basis(inventory)
    bpp = (lambda b: 8 * b / basis.params) if basis.params else (lambda b: 0.0)
    x = (lambda b: b / basis.fp16_bytes) if basis.fp16_bytes else (lambda b: 0.0)
    return BudgetRange(min_bytes, max_bytes, bpp(min_bytes), bpp(max_bytes), x(min_bytes),
                       x(max_bytes), source)


def _bits_colour(bits: int) -> str:
    """2 bits red … 8 bits green; 16 (kept in fp16) blue."""
    if bits >= 16:
        return "hsl(210, 60%, 75%)"
    hue = max(0, min(120, (bits - 2) * 20))
    return f"hsl({hue}, 65%, 72%)"


@dataclass(frozen=True)
class Heatmap:
    kinds: list[str]
    rows: list[tuple[str, list[dict[str, Any] | None]]]   # (block, cell per kind)


def heatmap(linears: list[dict[str, Any]]) -> Heatmap:
    """One row per block, one column per linear kind (`self_attn.q_proj`, …); a cell is that
    linear's option with its colour. Names without a block number form their own row."""
    kinds: list[str] = []
    rows: dict[str, dict[str, dict]] = {}
    for li in linears:
        m = _BLOCK.match(li["name"])
        block, kind = (m["block"], m["kind"]) if m else ("other", li["name"])
        if kind not in kinds:
            kinds.append(kind)
        rows.setdefault(block, {})[kind] = li | {"colour": _bits_colour(int(li["bits"]))}
    order = sorted(rows, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0, b))
    return Heatmap(kinds, [(b, [rows[b].get(k) for k in kinds]) for b in order])


def short_kind(kind: str) -> str:
    return kind.rsplit(".", 1)[-1]
