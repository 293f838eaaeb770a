"""From a stored profile to the solver's problem: each linear's option menu with exact bytes
and predicted damage α_i · E_i(b, r) (or α_i · t²_i(type) for a GGUF profile, whose every type
was measured), plus the predicted ΔKL of any plan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from compressor.pipeline.profile_store import LinearProfile, Profile
from solver import AllocationProblem, Constraints, LinearMenu, Option
from solver.bytes import FP16_BITS, gguf_option
from solver.errormodel import ErrorModel

GGUF_FIT = "gguf"   # the `kind` of a GGUF profile record's fit (gguf_target.sample_gguf)


@dataclass(frozen=True)
class MenuConfig:
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    ranks: tuple[int, ...] = (0, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    all_groups: bool = True     # every profiled group size; False: the profile's own only


def menu_options(lp: LinearProfile, profile: Profile, menu: MenuConfig) -> list[Option]:
    """The profile's own group size first, then the larger ones it measured κ for."""
    cfg = profile.config
    frac = float(cfg.get("max_rank_fraction", 0.5))
    max_rank = max(1, int(frac * min(lp.out_features, lp.in_features)))
    fb, gs = int(cfg.get("factor_bits", 4)), int(cfg.get("group_size", 128))
    # the embedding and head (no block) are Q alone: a lookup has no L·R (vocab.py)
    ranks = [r for r in menu.ranks if r <= max_rank] if lp.block is not None else [0]
    groups = [gs]
    if menu.all_groups:
        groups += [g for g in ErrorModel.from_dict(lp.fit).groups() if g != gs]
    return [Option(b, r, fb, g) for g in groups for b in menu.bits for r in ranks]


def linear_menu(lp: LinearProfile, profile: Profile, menu: MenuConfig) -> LinearMenu:
    if is_gguf_fit(lp.fit):   # a GGUF profile: every type measured, no model to evaluate
        options, t2 = gguf_options(lp.fit)
        return LinearMenu(lp.name, lp.out_features, lp.in_features, options,
                          errors=[lp.alpha * e for e in t2])
    model = ErrorModel.from_dict(lp.fit)
    options = menu_options(lp, profile, menu)
    errors = [lp.alpha * float(model.predict(o.bits, o.rank, o.group_size)) for o in options]
    return LinearMenu(lp.name, lp.out_features, lp.in_features, options, errors=errors)


def build_problem(profile: Profile, budget=None, constraints: Mapping | Constraints | None = None,
                  menu: MenuConfig | None = None) -> AllocationProblem:
    """The allocation problem of a profile (budget may be None: a budget-free problem)."""
    menu = menu or MenuConfig()
    if constraints is not None and not isinstance(constraints, Constraints):
        constraints = Constraints.from_dict(dict(constraints))
    problem = AllocationProblem([linear_menu(lp, profile, menu) for lp in profile.linears],
                                fixed_bytes=profile.fixed_bytes, constraints=constraints,
                                fp16_bytes=profile.stats.get("fp16_bytes"))
    return problem.with_budget(budget) if budget is not None else problem


def predicted_kl(profile: Profile, assignments: Mapping[str, Option]) -> float:
    """Σ α_i · E_i(option_i): the profile's prediction of KL to the original model."""
    total = 0.0
    for lp in profile.linears:
        opt = assignments.get(lp.name)
        if opt is None or opt.bits == FP16_BITS:   # kept as stored / dense: no error
            continue
        if is_gguf_fit(lp.fit):
            total += lp.alpha * gguf_error(lp.fit, opt)
            continue
        model = ErrorModel.from_dict(lp.fit)
        total += lp.alpha * float(model.predict(opt.bits, opt.rank, opt.group_size))
    return total


def block_of(profile: Profile) -> dict[str, int]:
    return {lp.name: lp.block for lp in profile.linears if lp.block is not None}


def is_gguf_fit(fit: dict) -> bool:
    return fit.get("kind") == GGUF_FIT


def gguf_options(fit: dict) -> tuple[list[Option], list[float]]:
    """A GGUF record's options and their t², in the record's order."""
    errors = fit["errors"]
    return [gguf_option(t) for t in errors], [float(e) for e in errors.values()]


def gguf_error(fit: dict, option: Option) -> float:
    """t² of `option` in a GGUF record; KeyError naming the types when it was not measured."""
    try:
        return float(fit["errors"][option.gguf_type])
    except KeyError:
        raise KeyError(f"type {option.gguf_type or option.label} was not profiled "
                       f"(profiled: {', '.join(fit['errors'])})") from None
