import math

import numpy as np
import pytest

from solver import AllocationProblem, BudgetError, InfeasibleBudget, parse_budget, solve
from solver.synthetic import random_problem

SIZES = {"fp16_bytes": 4000}   # a model of 2000 parameters


@pytest.mark.parametrize("text, expected", [
    (1234, 1234), ("1234", 1234), (" 1234 ", 1234), (1e3, 1000), ("1.2GB", 1_200_000_000),
    ("1.2 GB", 1_200_000_000), ("1.2gb", 1_200_000_000), ("850MiB", 850 * 2**20),
    ("1.5KiB", 1536), ("2KB", 2000), ("3B", 3), ("1e3", 1000), ("2.5TB", 2_500_000_000_000),
    ("0.1GiB", math.floor(0.1 * 2**30)), ("1_000", 1000),
    ("3.25bpp", 812), ("0.22x", 880), ("0.2201x", 880), ("1x", 4000),
])
def test_parse_budget_accepts(text, expected):
    assert parse_budget(text, **SIZES) == expected


def test_bpp_counts_every_parameter_and_floors():
    # 3.25 bits x 2000 params (fp16_bytes / 2) = 812.5 bytes -> 812; 16bpp is the fp16 size
    assert parse_budget("3.25bpp", **SIZES) == 812
    assert parse_budget("16bpp", **SIZES) == 4000
    assert parse_budget("8bpp", fp16_bytes=6) == 3


def test_decimal_sizes_are_exact():
    assert parse_budget("0.3GB", **SIZES) == 300_000_000  # not 299999999 from float rounding
    assert parse_budget("1.1MB", **SIZES) == 1_100_000


@pytest.mark.parametrize("bad, words", [
    ("-1GB", "positive"), ("0", "positive"), (0, "positive"), (-5, "positive"),
    (float("nan"), "finite"), (float("inf"), "finite"), ("nan", "finite"), ("inf GB", "finite"),
    ("1.2XB", "unknown budget unit 'xb'"), ("12 parsecs", "unknown budget unit"),
    ("abc", "cannot parse"), ("", "empty"), ("1.2.3GB", "cannot parse"), (True, "number"),
    (None, "number"), ([1], "number"), ("0.4B", "rounds down to 0"), ("100bpp", "64 bits"),
])
def test_parse_budget_rejects(bad, words):
    with pytest.raises(BudgetError, match=words):
        parse_budget(bad, **SIZES)


def test_budget_error_is_value_error():
    with pytest.raises(ValueError):
        parse_budget("lots", **SIZES)


def test_infeasible_budget_states_the_minimum():
    problem = random_problem(np.random.default_rng(0), 4, 3)
    lo, hi = problem.feasibility()
    with pytest.raises(InfeasibleBudget, match=f"minimum feasible .*{lo} B") as info:
        solve(problem.with_budget(lo - 1))
    assert (info.value.min_bytes, info.value.max_bytes, info.value.budget) == (lo, hi, lo - 1)
    assert isinstance(info.value, ValueError)
    solve(problem.with_budget(lo))  # exactly the minimum is feasible


def test_problem_parse_budget_uses_its_sizes():
    problem = random_problem(np.random.default_rng(1), 3, 2)
    params = problem.total_linear_params
    # every parameter: the linears' and the fixed bytes' (at 2 bytes each in the fp16 reference)
    assert problem.parse_budget("4bpp") == (params + problem.fixed_bytes // 2) * 4 // 8
    assert problem.parse_budget("0.5x") == (2 * params + problem.fixed_bytes) // 2
    assert AllocationProblem(problem.linears, problem.fixed_bytes, fp16_bytes=1000).parse_budget("0.5x") == 500
    assert problem.with_budget("1KB").budget == 1000
