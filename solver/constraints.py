"""Constraints on the menus (bit bounds, pins, allowed ranks, ties), resolved per linear by
glob, and the words used to explain them when they leave a linear nothing."""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from solver.bytes import (
    FP16_BITS,
    Option,
    check_option_fields,
    ct_dense,
    field_problem,
    gguf_option,
)

CONSTRAINT_KEYS = ("min_bits", "max_bits", "pinned", "allowed_ranks", "ties")


def _as_glob_map(value: Any) -> dict[str, Any]:
    """An int/collection applies to every linear (glob ``*``); a mapping is glob -> value."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    return {"*": value}


@dataclass(frozen=True)
class Constraints:
    """Restrictions on the menus. Globs use fnmatch (``*`` also crosses dots); exact names work.

    - ``min_bits`` / ``max_bits``: bounds on Q bits, an int for every linear or glob -> int;
    - ``pinned``: glob -> Option (exactly that option) or a partial dict such as ``{"rank": 256}``
      (every field given must match, the note's ``pattern_overrides`` form);
    - ``allowed_ranks``: a collection of ranks for every linear or glob -> collection;
    - ``ties``: groups of globs; all linears a group matches share one option (groups that share
      a linear are merged).
    Where several globs match one linear, all of them apply.
    """

    min_bits: Mapping[str, int] | int | None = None
    max_bits: Mapping[str, int] | int | None = None
    pinned: Mapping[str, Option | Mapping[str, Any]] = field(default_factory=dict)
    allowed_ranks: Mapping[str, Collection[int]] | Collection[int] | None = None
    ties: Sequence[Sequence[str]] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once here
        set_(self, "min_bits", _as_glob_map(self.min_bits))
        set_(self, "max_bits", _as_glob_map(self.max_bits))
        set_(self, "allowed_ranks", {g: frozenset(int(r) for r in v) for g, v in
                                     _as_glob_map(self.allowed_ranks).items()})
        set_(self, "pinned", dict(self.pinned or {}))
        ties = self.ties
        if ties and all(isinstance(t, str) for t in ties):
            ties = [ties]  # a single group given flat
        set_(self, "ties", [list(group) for group in ties])
        for glob, pin in self.pinned.items():
            if isinstance(pin, Mapping):
                check_option_fields(pin, f"pinned[{glob!r}]", error=ConstraintError)
            elif not isinstance(pin, Option):
                raise ConstraintError(f"pinned[{glob!r}] must be an Option or a dict of its "
                                      "fields")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Constraints:
        """From JSON: pinned values are option-field dicts (all five fields = an exact pin)."""
        validate_constraints(d)
        d = dict(d or {})
        return cls(min_bits=d.get("min_bits"), max_bits=d.get("max_bits"),
                   pinned=dict(d.get("pinned") or {}), allowed_ranks=d.get("allowed_ranks"),
                   ties=d.get("ties") or ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_bits": dict(self.min_bits), "max_bits": dict(self.max_bits),
            "pinned": {g: p.to_dict() if isinstance(p, Option) else dict(p)
                       for g, p in self.pinned.items()},
            "allowed_ranks": {g: sorted(v) for g, v in self.allowed_ranks.items()},
            "ties": [list(t) for t in self.ties],
        }

    def filter(self, name: str, options: Sequence[Option]) -> list[int]:
        """Indices of `options` the per-linear rules (not ties) allow for linear `name`."""
        def hits(glob: str) -> bool:
            return fnmatch.fnmatchcase(name, glob)
        lo = max((v for g, v in self.min_bits.items() if hits(g)), default=None)
        hi = min((v for g, v in self.max_bits.items() if hits(g)), default=None)
        rank_sets = [v for g, v in self.allowed_ranks.items() if hits(g)]
        pins = [v for g, v in self.pinned.items() if hits(g)]

        def ok(opt: Option) -> bool:
            if (lo is not None and opt.bits < lo) or (hi is not None and opt.bits > hi):
                return False
            if any(opt.rank not in ranks for ranks in rank_sets):
                return False
            for pin in pins:
                if isinstance(pin, Option):
                    if opt != pin:
                        return False
                elif any(getattr(opt, k) != v for k, v in pin.items()):
                    return False
            return True
        if lo is None and hi is None and not rank_sets and not pins:
            return list(range(len(options)))
        return [k for k, o in enumerate(options) if ok(o)]

    def rules_for(self, name: str) -> list[str]:
        """The per-linear rules that apply to `name`, in words (for error messages)."""
        def hits(glob: str) -> bool:
            return fnmatch.fnmatchcase(name, glob)
        lo = max((v for g, v in self.min_bits.items() if hits(g)), default=None)
        hi = min((v for g, v in self.max_bits.items() if hits(g)), default=None)
        out = [] if lo is None else [f"min_bits {lo}"]
        out += [] if hi is None else [f"max_bits {hi}"]
        out += [f"allowed_ranks {sorted(v)}" for g, v in self.allowed_ranks.items() if hits(g)]
        out += [f"pinned {_option_text(p) if isinstance(p, Option) else dict(p)}"
                for g, p in self.pinned.items() if hits(g)]
        return out

    @cached_property
    def _asks_fp16(self) -> bool:
        return any(_pin_bits(p) == FP16_BITS for p in self.pinned.values()) or \
            any(v >= FP16_BITS for v in self.min_bits.values())

    def dense_option(self, name: str, template: Option) -> Option | None:
        """The 16-bit (dense fp16) option the rules ask of `name`: a pin with bits 16 or
        min_bits 16. Partial pins fill in from `template` (rank 0). None when none is asked."""
        if not self._asks_fp16:
            return None
        if template.gguf_type:   # a GGUF menu's dense option is the F16 type
            template = gguf_option("F16")
        if template.ct:          # a compressed-tensors menu's is FP16 (in its ignore list)
            template = ct_dense()
        for glob, pin in self.pinned.items():
            if _pin_bits(pin) == FP16_BITS and fnmatch.fnmatchcase(name, glob):
                if isinstance(pin, Option):
                    return pin
                if template.gguf_type or template.ct:
                    return template
                return replace(template, **({"bits": FP16_BITS, "rank": 0} | dict(pin)))
        if any(v >= FP16_BITS for g, v in self.min_bits.items() if fnmatch.fnmatchcase(name, g)):
            return template if template.gguf_type or template.ct else replace(template, bits=FP16_BITS, rank=0)
        return None

    def globs(self) -> list[tuple[str, str]]:
        """Every (field, glob) pair, for the "matches nothing" check."""
        out = [(f, g) for f in ("min_bits", "max_bits", "allowed_ranks", "pinned")
               for g in getattr(self, f)]
        out += [("ties", g) for group in self.ties for g in group]
        return out


def _pin_bits(pin: Option | Mapping[str, Any]) -> Any:
    return pin.bits if isinstance(pin, Option) else pin.get("bits")


def _option_text(o: Option) -> str:
    return o.label


def describe_options(options: Sequence[Option], first: int = 4) -> str:
    """A linear's menu in a line: the values of each field, then the first few options."""
    def values(f: str) -> str:
        return ",".join(str(v) for v in sorted({getattr(o, f) for o in options}))
    fields = f"bits {values('bits')}; ranks {values('rank')}; factor bits " \
             f"{values('factor_bits')}; group sizes {values('group_size')}"
    shown = ", ".join(_option_text(o) for o in options[:first])
    more = f" (+{len(options) - first} more)" if len(options) > first else ""
    return f"its {len(options)} options: {fields} — {shown}{more}"


class ConstraintError(ValueError):
    """Constraints the solver cannot use; the message says which field and why."""


def _field(name: str, v: Any, where: str) -> None:
    """A bound or rank list entry is checked as the option field it bounds."""
    problem = field_problem(name, v)
    if problem:
        raise ConstraintError(f"{where}: {problem}")


def _glob_map(value: Any, fld: str) -> dict[str, Any]:
    """An int/collection for every linear, or a mapping glob -> value (as the solver takes it)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        for g in value:
            if not isinstance(g, str) or not g:
                raise ConstraintError(f"{fld}: globs must be non-empty strings, got {g!r}")
        return dict(value)
    return {"*": value}


def validate_constraints(constraints: Mapping[str, Any] | None,
                         linear_names: Sequence[str] | None = None) -> None:
    """The one validator of constraints as JSON gives them: ConstraintError (a ValueError, the
    message naming the field and why) for anything the solver would reject or misread, and,
    given the model's linear names, for a glob that matches none of them."""
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
    for fld in ("min_bits", "max_bits"):
        bounds[fld] = _glob_map(constraints.get(fld), fld)
        for g, v in bounds[fld].items():
            _field("bits", v, f"{fld}[{g!r}]" if g != "*" else fld)
            globs.append((fld, g))
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
            _field("rank", r, "allowed_ranks")
        globs.append(("allowed_ranks", g))
    pinned = constraints.get("pinned") or {}
    if not isinstance(pinned, Mapping):
        raise ConstraintError("pinned must be a mapping of glob -> option fields")
    for g, pin in _glob_map(pinned, "pinned").items():
        check_option_fields(pin, f"pinned[{g!r}]", error=ConstraintError)
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
    for fld, g in globs if linear_names is not None else ():
        if not any(fnmatch.fnmatchcase(n, g) for n in linear_names):
            raise ConstraintError(f"constraint {fld} glob {g!r} matches no linear")
