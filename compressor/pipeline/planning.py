"""From a stored profile to the solver's problem: each linear's option menu with exact bytes
and predicted damage α_i · E_i(b, r) (or α_i · t²_i(option) for a GGUF or compressed-tensors
profile, whose every option was measured), plus the predicted ΔKL of any plan. A
compressed-tensors problem always ties the modules vLLM fuses (q/k/v, gate/up): they share one
option in the solver itself (solver.problem's super-items), whatever else is asked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from compressor.pipeline.profile_store import LinearProfile, Profile
from solver import AllocationProblem, Constraints, LinearMenu, Option, Plan
from solver.bytes import FP16_BITS, ct_dense, ct_option_from_label, gguf_option
from solver.ct_schemes import CT_TARGET
from solver.errormodel import ErrorModel
from solver.problem import fused_groups

GGUF_FIT = "gguf"   # the `kind` of a GGUF profile record's fit (gguf_target.sample_gguf)
CT_FIT = "ct"       # … of a compressed-tensors one (ct_target.sample_ct)
# a measured table's kind → how its labels name options
_MEASURED = {GGUF_FIT: gguf_option, CT_FIT: ct_option_from_label}


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
    if is_measured_fit(lp.fit):   # every option measured: no model to evaluate
        options, t2 = measured_options(lp.fit)
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
    if profile.config.get("target") == CT_TARGET:
        constraints = fused_ties(profile, constraints)
    problem = AllocationProblem([linear_menu(lp, profile, menu) for lp in profile.linears],
                                fixed_bytes=profile.fixed_bytes, constraints=constraints,
                                fp16_bytes=profile.stats.get("fp16_bytes"))
    return problem.with_budget(budget) if budget is not None else problem


def option_error(lp: LinearProfile, opt: Option) -> float:
    """E_i(option) of one linear, before its α: measured t² (GGUF, compressed-tensors) or the
    fitted model's prediction; 0 for an option kept as stored (16 bits, dense)."""
    if opt.bits == FP16_BITS:
        return 0.0
    if is_measured_fit(lp.fit):
        return measured_error(lp.fit, opt)
    return float(ErrorModel.from_dict(lp.fit).predict(opt.bits, opt.rank, opt.group_size))


def predicted_kl(profile: Profile, assignments: Mapping[str, Option]) -> float:
    """Σ α_i · E_i(option_i): the profile's prediction of KL to the original model."""
    return sum(lp.alpha * option_error(lp, assignments[lp.name])
               for lp in profile.linears if lp.name in assignments)


def block_of(profile: Profile) -> dict[str, int]:
    return {lp.name: lp.block for lp in profile.linears if lp.block is not None}


def uniform_ct_plan(problem: AllocationProblem, bits: int, group: int = 128) -> Plan:
    """Every linear at W{bits}A16 with the largest group ≤ `group` its rows take (dense where
    none does): the uniform compressed-tensors model a team would write, as a Plan."""
    assignments = {}
    for lin in problem.linears:
        fits = [o for o in lin.options if o.ct and o.bits == bits and not o.rank
                and o.group_size <= group]
        assignments[lin.name] = max(fits, key=lambda o: o.group_size) if fits else ct_dense()
    total, err = problem.evaluate(assignments)
    return Plan(assignments, total, err, method=f"uniform W{bits}A16", optimal=False,
                fixed_bytes=problem.fixed_bytes)


def fused_ties(profile: Profile, constraints: Constraints | None) -> Constraints:
    """`constraints` plus one tie per group of modules vLLM fuses (exact names: no glob can
    reach another block's members)."""
    c = constraints or Constraints()
    ties = [list(t) for t in c.ties] + fused_groups([lp.name for lp in profile.linears])
    return Constraints.from_dict(c.to_dict() | {"ties": ties})


def is_gguf_fit(fit: dict) -> bool:
    return fit.get("kind") == GGUF_FIT


def is_measured_fit(fit: dict) -> bool:
    """A GGUF or compressed-tensors record: a table of measured t² per option label."""
    return fit.get("kind") in _MEASURED


def measured_options(fit: dict) -> tuple[list[Option], list[float]]:
    """A measured record's options and their t², in the record's order."""
    parse = _MEASURED[fit["kind"]]
    errors = fit["errors"]
    return [parse(t) for t in errors], [float(e) for e in errors.values()]


def measured_error(fit: dict, option: Option) -> float:
    """t² of `option` in a measured record; KeyError naming the options when it was not."""
    label = option.gguf_type or option.label
    try:
        return float(fit["errors"][label])
    except KeyError:
        raise KeyError(f"option {label} was not profiled "
                       f"(profiled: {', '.join(fit['errors'])})") from None
