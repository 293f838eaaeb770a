"""Plans as the research note's YAML recipes:

    default: {bits: 3, rank: 40, factor_bits: 4, group_size: 128, symmetric: false}
    pattern_overrides:
      model.layers.27.*: {rank: 256}
      model.layers.0.mlp.down_proj: {bits: 4}

Semantics (both directions): a linear takes `default`, unless override globs (fnmatch, in file
order) match its name; then the LAST matching override wins, and its fields replace the
default's (an override never inherits fields from another override; `{}` means the default).
Field names are checked per entry; field values per linear, once resolved, so an error names
the linear and the entries it came from (both with solver.bytes.check_option_fields).
Export picks the most common option as default, then greedily adds block globs
(``model.layers.N.*``) and cross-block globs (``model.layers.*.mlp.down_proj``) while each one
fixes at least two linears more than it breaks, then exact names for what is left.

A GGUF plan (the llama.cpp target: every option a ggml block type) says so and names types:

    target: gguf
    default: {gguf_type: Q4_K}
    pattern_overrides:
      model.layers.0.*: {gguf_type: Q6_K}

The type decides bits, rank and group size (solver.bytes.gguf_option): an entry naming a
gguf_type replaces those fields of the default, and any it gives itself must agree with the
type. `target` (native or gguf) may be left out: a recipe naming a gguf_type anywhere is a GGUF
one. Either way a recipe is one target: every linear of a GGUF recipe resolves to a type, none
of a native one does.
"""

from __future__ import annotations

import fnmatch
import glob
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import yaml

from solver.bytes import OPTION_FIELDS, Option, check_option_fields, gguf_option
from solver.problem import Plan

_BLOCK = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.)(\d+)\.(.+)$")
_MAX_RULES = 500
TARGETS = ("native", "gguf")
_GGUF_IMPLIED = ("bits", "rank", "group_size")   # what a gguf_type decides


def _diff(opt: Option, default: Option) -> dict[str, Any]:
    return {f: getattr(opt, f) for f in OPTION_FIELDS if getattr(opt, f) != getattr(default, f)}


def _candidate_globs(names: Sequence[str]) -> list[str]:
    """Block globs and cross-block (same position in every block) globs."""
    blocks: dict[str, None] = {}
    across: dict[str, None] = {}
    for n in names:
        m = _BLOCK.match(n)
        if m:
            head, idx, tail = m.groups()
            blocks[glob.escape(f"{head}{idx}.") + "*"] = None
            across[glob.escape(head) + "*." + glob.escape(tail)] = None
    return list(blocks) + list(across)


def compact_overrides(assignments: dict[str, Option]) -> tuple[Option, list[tuple[str, Option]]]:
    """(default, ordered [(glob, option)]) that reproduce `assignments` exactly."""
    names = list(assignments)
    counts = Counter(assignments[n] for n in names)
    default = max(counts, key=lambda o: (counts[o], -names.index(
        next(n for n in names if assignments[n] == o))))
    current = {n: default for n in names}
    rules: list[tuple[str, Option]] = []
    members = {g: [n for n in names if fnmatch.fnmatchcase(n, g)]
               for g in _candidate_globs(names)}
    for _ in range(_MAX_RULES):
        best: tuple[int, str, Option] | None = None
        for g, ms in members.items():
            wrong = [assignments[n] for n in ms if current[n] != assignments[n]]
            if len(wrong) < 2:
                continue
            opt, _ = Counter(wrong).most_common(1)[0]
            fixed = sum(1 for n in ms if current[n] != assignments[n] == opt)
            broken = sum(1 for n in ms if current[n] == assignments[n] != opt)
            if fixed - broken >= 2 and (best is None or fixed - broken > best[0]):
                best = (fixed - broken, g, opt)
        if best is None:
            break
        _, g, opt = best
        rules.append((g, opt))
        for n in members[g]:
            current[n] = opt
    rules += [(glob.escape(n), assignments[n]) for n in names if current[n] != assignments[n]]
    return default, rules


def plan_to_yaml(plan: Plan) -> str:
    """The note's recipe form, compacted; a comment header carries the plan's figures. A GGUF
    plan's entries name only their type (under `target: gguf`)."""
    default, rules = compact_overrides(dict(plan.assignments))
    gguf = bool(plan.assignments) and all(o.gguf_type for o in plan.assignments.values())
    if gguf:
        doc = {"target": "gguf", "default": {"gguf_type": default.gguf_type},
               "pattern_overrides": {g: {"gguf_type": o.gguf_type} for g, o in rules}}
    else:
        doc = {"default": default.to_dict(),
               "pattern_overrides": {g: _diff(o, default) for g, o in rules}}
    header = (f"# bitplan plan: method={plan.method} total_bytes={plan.total_bytes} "
              f"predicted_error={plan.predicted_error:.6g} optimal={plan.optimal}"
              f"{'' if plan.budget is None else f' budget={plan.budget}'}\n")
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=10_000)
    return header + body


def _fields(value: Any, where: str) -> dict[str, Any]:
    """An entry's fields by name (None: none); their values are checked per linear."""
    return {} if value is None else check_option_fields(value, where, values=False)


def plan_from_yaml(text: str, linear_names: Sequence[str]) -> dict[str, Option]:
    """Assignments for `linear_names` from a recipe (see the module docstring)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("recipe must be a mapping with 'default' and 'pattern_overrides'")
    unknown = set(doc) - {"target", "default", "pattern_overrides"}
    if unknown:
        raise ValueError(f"recipe: unknown keys {sorted(unknown)}")
    target = doc.get("target")
    if target is not None and target not in TARGETS:
        raise ValueError(f"recipe: target must be one of {', '.join(TARGETS)}, got {target!r}")
    default = _fields(doc.get("default"), "default")
    overrides = doc.get("pattern_overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError("pattern_overrides must be a mapping of glob -> option fields")
    rules = [(str(g), _fields(v, f"pattern_overrides[{g!r}]")) for g, v in overrides.items()]
    for g, _ in rules:
        if not any(fnmatch.fnmatchcase(n, g) for n in linear_names):
            raise ValueError(f"pattern_overrides glob {g!r} matches no linear")
    if target is None:   # left out: a recipe naming a GGUF type anywhere is a GGUF one
        named = [default, *(f for _, f in rules)]
        target = "gguf" if any(f.get("gguf_type") for f in named) else "native"
    out: dict[str, Option] = {}
    for n in linear_names:
        fields, source = dict(default), "default"
        for g, f in rules:
            if fnmatch.fnmatchcase(n, g):
                base = ({k: v for k, v in default.items() if k not in _GGUF_IMPLIED}
                        if f.get("gguf_type") else default)   # the type decides those
                fields, source = {**base, **f}, f"default + pattern_overrides[{g!r}]"
        where = f"{n} ({source})"
        fields = check_option_fields(fields, where)
        if target == "gguf":
            out[n] = _gguf_entry(fields, where)
            continue
        if fields.get("gguf_type"):
            raise ValueError(f"{where}: gguf_type {fields['gguf_type']} in a target native "
                             "recipe (a recipe is one target: say `target: gguf`)")
        if "bits" not in fields:
            raise ValueError(f"no bits for {n}: give them in 'default' or an override")
        out[n] = Option(**fields)
    return out


def _gguf_entry(fields: dict[str, Any], where: str) -> Option:
    """A GGUF recipe's option: its type, with any other field given agreeing with it."""
    name = fields.get("gguf_type")
    if not name:
        raise ValueError(f"{where}: no gguf_type in a target gguf recipe (give one in "
                         "'default' or an override, e.g. {gguf_type: Q4_K})")
    opt = gguf_option(name)
    wrong = [f"{k}={fields[k]!r}" for k in OPTION_FIELDS
             if k in fields and fields[k] != getattr(opt, k)]
    if wrong:
        implied = ", ".join(f"{k}={getattr(opt, k)!r}" for k in OPTION_FIELDS if k != "gguf_type")
        raise ValueError(f"{where}: {', '.join(wrong)} disagrees with gguf_type {name} "
                         f"({implied}; the type decides them)")
    return opt
