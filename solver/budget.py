"""Budget parsing: the one place a budget string becomes a byte count.

Accepted forms (whitespace and unit case are ignored):
- bytes: an int, a finite float (floored), or a string of digits ``"1234567"``;
- sizes: ``"1.2GB"`` (10**9), ``"850MiB"`` (2**20); units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB;
- bits per parameter: ``"3.25bpp"`` = ``floor(3.25 * params / 8)`` over *every* parameter of
  the model (``params = fp16_bytes / 2``: the linears, the embedding and head, norms, biases),
  so the figure is what the whole stored model costs per parameter, as llama.cpp's bpw is;
- fraction of fp16: ``"0.22x"`` = ``floor(0.22 * fp16_bytes)`` where ``fp16_bytes`` is the fp16
  size of the whole model (every parameter at 2 bytes).
Every result is floored to whole bytes: a budget is a cap, so rounding never goes above it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
# 1 PiB: larger than any model we could load; anything above is a typo, not a budget (and would
# overflow a 64-bit column further up).
MAX_BUDGET_BYTES = 2 ** 50
_NUMBER = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)$")


class BudgetError(ValueError):
    """A budget that cannot be understood (garbage, unknown unit, not a positive finite size)."""


class InfeasibleBudget(BudgetError):
    """A budget below the smallest plan the menus and constraints allow."""

    def __init__(self, budget: int, min_bytes: int, max_bytes: int, what: str = "") -> None:
        self.budget, self.min_bytes, self.max_bytes = budget, min_bytes, max_bytes
        short = min_bytes - budget
        super().__init__(
            f"budget {format_bytes(budget)} ({budget} B) is below the minimum feasible "
            f"{format_bytes(min_bytes)} ({min_bytes} B){' for ' + what if what else ''}, "
            f"short by {short} B; feasible budgets are {min_bytes}..{max_bytes} B "
            f"(more than {max_bytes} B buys nothing)")


def format_bytes(n: int | float) -> str:
    """Human-readable binary size, e.g. ``1.23 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"  # pragma: no cover - loop always returns


def _positive_int(value: Fraction, original: object) -> int:
    if value <= 0:
        raise BudgetError(f"budget must be positive, got {original!r}")
    out = math.floor(value)
    if out < 1:
        raise BudgetError(f"budget {original!r} rounds down to 0 bytes")
    return out


def parse_budget(text_or_int: str | int | float, *, fp16_bytes: int) -> int:
    """Parse a budget into whole bytes (see the module docstring for the accepted forms).

    ``fp16_bytes`` is the model's `fp16_reference_bytes`: the ``x`` reference, and twice the
    parameter count a ``bpp`` figure is taken over.
    """
    if isinstance(text_or_int, bool):
        raise BudgetError(f"budget must be a number of bytes or a string, got {text_or_int!r}")
    if isinstance(text_or_int, int):
        return _positive_int(Fraction(text_or_int), text_or_int)
    if isinstance(text_or_int, float):
        if not math.isfinite(text_or_int):
            raise BudgetError(f"budget must be finite, got {text_or_int!r}")
        return _positive_int(Fraction(text_or_int), text_or_int)
    if not isinstance(text_or_int, str):
        raise BudgetError(f"budget must be a number of bytes or a string, "
                          f"got {type(text_or_int).__name__}")
    text = text_or_int.strip().lower().replace(" ", "").replace("_", "")
    if not text:
        raise BudgetError("budget is empty")
    if any(word in text for word in ("nan", "inf")):
        raise BudgetError(f"budget must be a finite number, got {text_or_int!r}")
    match = _NUMBER.match(text)
    if not match:
        raise BudgetError(f"cannot parse budget {text_or_int!r}: expected e.g. 1200000000, "
                          f"'1.2GB', '850MiB', '3.25bpp' or '0.22x'")
    number, unit = Fraction(match.group(1)), match.group(2)
    if number <= 0:
        raise BudgetError(f"budget must be positive, got {text_or_int!r}")
    if unit in ("", "b") or unit in UNITS:
        return _positive_int(number * UNITS.get(unit or "b", 1), text_or_int)
    if unit == "bpp":
        if fp16_bytes <= 0:
            raise BudgetError("a bpp budget needs fp16_bytes > 0 (every parameter at 2 bytes)")
        if number > 64:
            raise BudgetError(f"{text_or_int!r}: more than 64 bits per parameter is not a budget")
        return _positive_int(number * fp16_bytes / 16, text_or_int)
    if unit == "x":
        if fp16_bytes <= 0:
            raise BudgetError("an 'x' budget needs fp16_bytes > 0")
        return _positive_int(number * fp16_bytes, text_or_int)
    raise BudgetError(f"unknown budget unit {match.group(2)!r} in {text_or_int!r}; use one of "
                      f"B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, bpp, x")


def fp16_reference_bytes(linear_params: int, kept_params: int) -> int:
    """The reference of an ``x`` budget: every parameter of the model (compressible linears and
    kept ones alike) at 2 bytes, whatever dtype it is stored in. The one place this is computed:
    the service (from a layer inventory) and the profile (from the loaded model) both call it,
    so ``"0.3x"`` means the same bytes everywhere."""
    return 2 * (int(linear_params) + int(kept_params))


@dataclass(frozen=True)
class BudgetBasis:
    """What a budget string is measured against for one model: its compressible parameters, the
    bytes kept uncompressed, and the fp16 reference (`fp16_reference_bytes`)."""

    linear_params: int
    fixed_bytes: int
    fp16_bytes: int

    @classmethod
    def of(cls, linear_params: int, kept_params: int, fixed_bytes: int) -> BudgetBasis:
        return cls(int(linear_params), int(fixed_bytes),
                   fp16_reference_bytes(linear_params, kept_params))

    def parse(self, budget: str | int | float) -> int:
        return parse_budget(budget, fp16_bytes=self.fp16_bytes)

    @property
    def params(self) -> int:
        """Every parameter of the model (what a bpp figure is per)."""
        return self.fp16_bytes // 2
