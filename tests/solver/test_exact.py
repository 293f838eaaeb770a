"""The exact solver against brute force and CP-SAT; greedy and frontier against the same."""

import json

import numpy as np
import pytest

from solver import FrontierTooLarge, Method, Plan, frontier, solve
from solver.cpsat import rounding_slack
from solver.synthetic import QWEN2_1_5B, random_problem, synthetic_problem
from tests.solver import brute

TOL = 1e-9


def _random_instances(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield random_problem(rng, int(rng.integers(1, 6)), int(rng.integers(1, 6)),
                             budget_frac=float(rng.uniform(-0.05, 1.05)))


def test_exact_equals_brute_force_on_300_random_instances():
    checked = 0
    for problem in _random_instances(300, seed=1):
        if problem.budget < problem.feasibility()[0]:
            continue
        want_bytes, want_err = brute.best(problem)
        plan = solve(problem, Method.EXACT)
        assert plan.total_bytes <= problem.budget
        assert plan.predicted_error == pytest.approx(want_err, abs=TOL)
        assert plan.optimal and plan.gap == 0.0
        # the plan's own figures are consistent with its assignments
        assert problem.evaluate(plan.assignments) == (plan.total_bytes,
                                                      pytest.approx(plan.predicted_error))
        checked += 1
    assert checked >= 200


def test_greedy_is_feasible_and_its_gap_is_certified():
    for problem in _random_instances(150, seed=2):
        if problem.budget < problem.feasibility()[0]:
            continue
        _, best_err = brute.best(problem)
        plan = solve(problem, "greedy")
        assert plan.total_bytes <= problem.budget
        assert plan.predicted_error >= best_err - TOL
        assert plan.lower_bound <= best_err + TOL  # the LP bound really is a bound


def test_complete_frontier_equals_brute_force_pareto_set():
    for problem in _random_instances(120, seed=3):
        want = brute.pareto(problem)
        got = frontier(problem, complete=True)
        assert [c for c, _ in got] == [c for c, _ in want]
        assert np.allclose([e for _, e in got], [e for _, e in want], atol=TOL)


def test_supported_frontier_points_are_exact_optima():
    for problem in _random_instances(120, seed=4):
        full = dict(frontier(problem, complete=True))
        pts = frontier(problem)
        assert all(a[0] < b[0] and a[1] > b[1] for a, b in zip(pts, pts[1:], strict=False))
        for c, e in pts:
            assert c in full and full[c] == pytest.approx(e, abs=TOL)


def test_supported_frontier_matches_solve_on_a_model_sized_problem():
    problem, _, _ = synthetic_problem(QWEN2_1_5B, 40, seed=5, layers=6)
    pts = frontier(problem)
    lo, hi = problem.feasibility()
    assert pts[0][0] == lo and pts[-1][0] == problem.saturation_bytes()
    for c, e in pts[:: max(1, len(pts) // 12)]:
        plan = solve(problem.with_budget(c))
        assert plan.total_bytes == c and plan.predicted_error == pytest.approx(e, rel=1e-12)


def test_frontier_too_large_is_reported():
    problem, _, _ = synthetic_problem(QWEN2_1_5B, 40, seed=6, layers=2)
    with pytest.raises(FrontierTooLarge):
        frontier(problem, complete=True, max_points=50)


@pytest.mark.parametrize("seed, layers, n_options, bpp", [
    (7, 4, 20, 3.0), (8, 4, 40, 4.1), (9, 6, 24, 2.6), (10, 8, 16, 3.5)])
def test_exact_equals_cpsat_on_medium_instances(seed, layers, n_options, bpp):
    problem, _, _ = synthetic_problem(QWEN2_1_5B, n_options, seed=seed, layers=layers,
                                      bits_per_param=bpp)
    exact = solve(problem, Method.EXACT)
    cp = solve(problem, Method.CPSAT, time_limit_s=60, workers=2)
    assert cp.optimal, cp.info
    slack = rounding_slack(problem.menus)
    assert exact.predicted_error <= cp.predicted_error + TOL
    assert cp.predicted_error <= exact.predicted_error + slack + TOL
    assert exact.total_bytes <= problem.budget and cp.total_bytes <= problem.budget


def test_budget_is_never_exceeded_across_the_range():
    problem, _, _ = synthetic_problem(QWEN2_1_5B, 30, seed=11, layers=5)
    lo, hi = problem.feasibility()
    last = np.inf
    for budget in np.linspace(lo, hi + 1000, 25).astype(int).tolist():
        p = problem.with_budget(budget)
        exact, greedy = solve(p), solve(p, "greedy")
        for plan in (exact, greedy):
            assert plan.total_bytes <= budget
            assert plan.total_bytes == problem.evaluate(plan.assignments)[0]
        assert exact.predicted_error <= greedy.predicted_error + TOL
        assert greedy.lower_bound <= exact.predicted_error + TOL
        assert exact.predicted_error <= last + TOL  # more budget never hurts
        last = exact.predicted_error


def test_no_budget_gives_the_least_error_plan():
    problem = random_problem(np.random.default_rng(12), 5, 4)
    plan = solve(problem)
    errs = [min(lin.errors) for lin in problem.linears]
    assert plan.predicted_error == pytest.approx(sum(errs))
    assert plan.total_bytes == problem.saturation_bytes()
    assert plan.optimal and plan.budget is None


def test_methods_accept_strings_and_reject_unknown():
    problem = random_problem(np.random.default_rng(13), 3, 3, budget_frac=0.5)
    assert solve(problem, "EXACT").method == "exact"
    assert solve(problem, Method.GREEDY).method == "greedy"
    with pytest.raises(ValueError, match="unknown method"):
        solve(problem, "simplex")


def test_plan_json_round_trip():
    problem, _, _ = synthetic_problem(QWEN2_1_5B, 20, seed=14, layers=3, bits_per_param=3.3)
    plan = solve(problem)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert again.assignments == plan.assignments
    assert sum(again.linear_bytes.values()) + again.fixed_bytes == again.total_bytes


def test_exact_equals_brute_force_on_wider_instances():
    rng = np.random.default_rng(15)
    for _ in range(20):
        problem = random_problem(rng, 8, 3, budget_frac=float(rng.uniform(0.1, 0.9)))
        _, want = brute.best(problem)
        plan = solve(problem)
        assert plan.predicted_error == pytest.approx(want, abs=TOL)
        assert plan.total_bytes <= problem.budget


def test_budget_copies_share_the_prepared_menus():
    problem, _, _ = synthetic_problem(QWEN2_1_5B, 20, seed=16, layers=2)
    a, b = problem.with_budget("3bpp"), problem.with_budget("4bpp")
    assert a.menus is b.menus is problem.menus and a.lp is problem.lp
    assert solve(a).predicted_error > solve(b).predicted_error


def test_work_limit_falls_back_to_cpsat_with_an_honest_flag(monkeypatch):
    import solver.dp

    problem, _, _ = synthetic_problem(QWEN2_1_5B, 20, seed=17, layers=3, bits_per_param=3.1)
    want = solve(problem)
    monkeypatch.setattr(solver.dp, "MAX_WORK", 5)
    plan = solve(problem, time_limit_s=30, workers=2)
    assert plan.info["fallback"] == "cpsat" and plan.info["dp_runs"] >= 1
    assert plan.total_bytes <= problem.budget
    assert plan.lower_bound <= want.predicted_error + TOL
    if plan.optimal:
        slack = rounding_slack(problem.menus)
        assert plan.predicted_error <= want.predicted_error + slack + TOL
    else:
        assert plan.gap > 0
