"""Planning glue, torch-free (solver and the front door compressor.api only), shared by the API's
synchronous checks and the solve stage: a budget becomes bytes once, against the model's one
reference (`solver.BudgetBasis`), and every problem of a complete profile is built once.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from typing import Any

import solver
from compressor import api
from compressor.checkpoint.headers import VOCAB_KINDS
from compressor.pipeline.profile_store import Profile
from solver.budget import MAX_BUDGET_BYTES, BudgetError, InfeasibleBudget
from solver.bytes import Option, fp16_bytes, option_bytes
from solver.constraints import validate_constraints
from solver.ct_schemes import CT_TARGET, menu_bytes_range
from solver.gguf_types import GGUF_MENU, gguf_tensor_bytes, types_for_row

_PROBLEMS: OrderedDict[tuple[str, str], solver.AllocationProblem] = OrderedDict()
_PROBLEMS_LOCK = threading.Lock()
_PROBLEMS_SIZE = 32


# -- before a profile exists: the layer inventory (config.json + safetensors headers) ---------
def inventory_basis(inventory: dict) -> solver.BudgetBasis:
    linears = inventory.get("linears", [])
    kept = inventory.get("kept", [])
    return solver.BudgetBasis.of(
        linear_params=sum(int(li["out_features"]) * int(li["in_features"]) for li in linears),
        kept_params=sum(math.prod(k["shape"]) for k in kept),
        fixed_bytes=sum(int(k["nbytes"]) for k in kept))


def inventory_feasibility(inventory: dict, target: str = "native",
                          gguf_menu: tuple[str, ...] = GGUF_MENU) -> tuple[int, int]:
    """Bytes range from the layer inventory alone. Native: every linear at 2 bits without
    correction, and every linear at fp16; kept parameters at their dtype. GGUF: every tensor at
    the cheapest type of the menu its rows fit, and at its dearest; kept (1-D) tensors at 4
    bytes a parameter, as llama.cpp's converter writes them (compressor.pipeline.targets
    .fixed_bytes). compressed-tensors: every block linear's cheapest and dearest scheme (+ its
    largest LoRA), the rest in fp16."""
    shapes = [(int(li["out_features"]), int(li["in_features"]))
              for li in inventory.get("linears", [])]
    if target == "gguf":
        kept = 4 * sum(math.prod(k["shape"]) for k in inventory.get("kept", []))
        lo = hi = kept
        for m, n in shapes:
            sizes = [gguf_tensor_bytes(t, m, n) for t in types_for_row(n, tuple(gguf_menu))]
            if not sizes:
                raise BudgetError(f"no GGUF type of {list(gguf_menu)} stores rows of {n} "
                                  "elements; this model cannot be planned for target gguf")
            lo, hi = lo + min(sizes), hi + max(sizes)
        return lo, hi
    if target == CT_TARGET:   # the embedding and head stay fp16 (compressor.pipeline.targets)
        vocab = [li for li in inventory.get("linears", []) if li.get("kind") in VOCAB_KINDS]
        lo = hi = 2 * (sum(math.prod(k["shape"]) for k in inventory.get("kept", []))
                       + sum(int(li["out_features"]) * int(li["in_features"]) for li in vocab))
        for li in inventory.get("linears", []):
            if li.get("kind") not in VOCAB_KINDS:
                m, n = int(li["out_features"]), int(li["in_features"])
                a, b = menu_bytes_range(m, n, max(1, min(m, n) // 2))
                lo, hi = lo + a, hi + b
        return lo, hi
    kept = sum(int(k["nbytes"]) for k in inventory.get("kept", []))
    low = Option(bits=2, rank=0)
    return (kept + sum(option_bytes(m, n, low) for m, n in shapes),
            kept + sum(fp16_bytes(m, n) for m, n in shapes))


def inventory_names(inventory: dict) -> list[str]:
    return [str(li["name"]) for li in inventory.get("linears", [])]


def budget_bytes(inventory: dict, budget: str | int | float) -> int:
    """The one parse of a request's budget: bad strings, units and absurd sizes fail here with
    the solver's message."""
    nbytes = inventory_basis(inventory).parse(budget)
    if nbytes > MAX_BUDGET_BYTES:
        raise BudgetError(f"budget {budget!r} is over the 1 PiB ({MAX_BUDGET_BYTES} byte) limit")
    return nbytes


def check_inventory_minimum(nbytes: int, inventory: dict, target: str = "native",
                            gguf_menu: tuple[str, ...] = GGUF_MENU) -> None:
    """Before a profile exists: budgets below the inventory's minimum (every linear at 2 bits;
    for gguf, every tensor at its cheapest type) name the feasible range (with a profile, its
    own problem is the authority: `problem_at`)."""
    lo, hi = inventory_feasibility(inventory, target, gguf_menu)
    if nbytes < lo:
        raise InfeasibleBudget(nbytes, lo, hi)


def check_constraints(constraints: dict | None, inventory: dict) -> None:
    validate_constraints(constraints, inventory_names(inventory))


# -- with a complete profile ------------------------------------------------------------------
def base_problem(profile: Profile, constraints: dict | None,
                 profile_id: str | None = None) -> solver.AllocationProblem:
    """The budget-less problem of a profile + constraints. Complete profiles never change, so
    it is cached by (profile, constraints): menus and their Pareto/LP data are built once and a
    cached-profile plan request only solves."""
    ck = (profile_id or profile.key, json.dumps(constraints or {}, sort_keys=True, default=str))
    with _PROBLEMS_LOCK:
        hit = _PROBLEMS.get(ck)
        if hit is not None:
            _PROBLEMS.move_to_end(ck)
            return hit
    problem = api.problem(profile, None, constraints or None)
    with _PROBLEMS_LOCK:
        _PROBLEMS[ck] = problem
        while len(_PROBLEMS) > _PROBLEMS_SIZE:
            _PROBLEMS.popitem(last=False)
    return problem


def problem_at(profile: Profile, nbytes: int, constraints: dict | None,
               profile_id: str | None = None) -> solver.AllocationProblem:
    """The problem at a budget in bytes; InfeasibleBudget (naming the minimum) below it."""
    problem = base_problem(profile, constraints, profile_id).with_budget(int(nbytes))
    problem.check_budget()
    return problem


def solve_plan(profile: Profile, nbytes: int, constraints: dict | None, method: str,
               profile_id: str | None = None) -> solver.Plan:
    """The plan at `nbytes` on the cached budget-free problem (InfeasibleBudget below it)."""
    return api.plan(profile, nbytes, method=method,
                    base=base_problem(profile, constraints, profile_id))


def feasibility(profile: Profile, constraints: dict | None = None,
                profile_id: str | None = None) -> tuple[int, int]:
    lo, hi = base_problem(profile, constraints, profile_id).feasibility()
    return int(lo), int(hi)


def frontier_points(profile: Profile, constraints: dict | None,
                    profile_id: str | None = None) -> list[tuple[int, float]]:
    """The Pareto frontier (bytes, predicted error) of a plan's problem (budget-free)."""
    return [(int(b), float(e))
            for b, e in solver.frontier(base_problem(profile, constraints, profile_id))]


def linear_table(plan: solver.Plan) -> list[dict[str, Any]]:
    """One row per linear: its option (bits, rank, factor bits, group size), bytes, error."""
    return [{"name": name} | opt.to_dict() | {"bytes": plan.linear_bytes.get(name),
                                              "predicted_error": plan.linear_errors.get(name)}
            for name, opt in plan.assignments.items()]
