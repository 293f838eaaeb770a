"""The note's baselines: same budget, never above it, shapes as the note describes."""

import numpy as np
import pytest

from solver import InfeasibleBudget, solve
from solver.strategies import STRATEGIES, all_baselines, baseline, block_weights
from solver.synthetic import QWEN2_1_5B, synthetic_problem


@pytest.fixture(scope="module")
def model():
    return synthetic_problem(QWEN2_1_5B, 40, seed=21, bits_per_param=3.6)


def test_every_baseline_spends_the_budget_without_exceeding_it(model):
    problem, scores, block_of = model
    plans = all_baselines(problem, scores, block_of)
    assert set(plans) == set(STRATEGIES)
    optimum = solve(problem)
    for name, plan in plans.items():
        assert plan.total_bytes <= problem.budget, name
        # within one rank step of the smallest linear of spending it all
        assert problem.budget - plan.total_bytes < 2_000_000, name
        assert all(o.bits == 3 and o.factor_bits == 4 for o in plan.assignments.values())
        assert plan.method == f"baseline:{name}" and not plan.optimal
        assert optimum.predicted_error <= plan.predicted_error


def test_shapes_follow_the_note(model):
    problem, scores, block_of = model
    order = sorted(scores, key=scores.get, reverse=True)

    def block_rank(plan, block):
        return np.mean([plan.assignments[n].rank for n, b in block_of.items() if b == block])

    ultra = baseline("ultra", problem, scores, block_of)
    top, rest = order[:2], order[4:]
    assert min(block_rank(ultra, b) for b in top) > max(block_rank(ultra, b) for b in rest)
    uniform = baseline("uniform", problem, list(scores.values()), block_of)
    block_ranks = {uniform.assignments[n].rank for n in block_of}
    assert len(block_ranks) <= 2  # one rank, plus top-up
    # the embedding is outside the blocks: the strategy's 3-bit Q, rank 0
    assert uniform.assignments["model.embed_tokens"].bits == 3
    assert uniform.assignments["model.embed_tokens"].rank == 0


def test_block_weights_generalise_to_any_block_count():
    for n in (1, 5, 28, 80):
        scores = np.linspace(1, 2, n)
        for name in STRATEGIES:
            w = block_weights(name, scores)
            assert w.shape == (n,) and np.all(w > 0)
    w = block_weights("tiered", np.arange(28.0))
    assert sorted(np.unique(w * 64).tolist()) == [44, 72, 128]
    assert (w * 64 == 128).sum() == 4 and (w * 64 == 72).sum() == 7


def test_baseline_errors(model):
    problem, scores, block_of = model
    with pytest.raises(ValueError, match="unknown strategy"):
        baseline("clever", problem, scores, block_of)
    with pytest.raises(ValueError, match="no block score"):
        baseline("uniform", problem, scores, dict.fromkeys(block_of, 99))
    with pytest.raises(ValueError, match="need a budget"):
        baseline("uniform", problem.with_budget(None), scores, block_of)
    lo, _ = problem.feasibility()
    with pytest.raises(InfeasibleBudget, match="baseline uniform at 3-bit"):
        baseline("uniform", problem.with_budget(lo + 1), scores, block_of)


def test_named_generators_match_baseline(model):
    from solver import strategies

    problem, scores, block_of = model
    for name in STRATEGIES:
        plan = getattr(strategies, name)(problem, scores, block_of)
        assert plan.assignments == baseline(name, problem, scores, block_of).assignments


def test_baselines_keep_the_menus_first_group_size(model):
    """With a cheaper group-512 copy of every option on the menu, the note's strategies still
    use the note's format (the menu's first group); only the planner mixes group sizes."""
    from solver import AllocationProblem, LinearMenu, Option

    problem, scores, block_of = model
    menus = []
    for m in problem.linears:
        wide = [Option(o.bits, o.rank, o.factor_bits, 512) for o in m.options]
        menus.append(LinearMenu(m.name, m.out_features, m.in_features, list(m.options) + wide,
                                errors=list(m.errors) + [1.2 * e for e in m.errors]))
    mixed = AllocationProblem(menus, fixed_bytes=problem.fixed_bytes).with_budget(problem.budget)
    first = problem.linears[0].options[0].group_size
    assert first != 512
    for name in STRATEGIES:
        plan = baseline(name, mixed, scores, block_of)
        assert {o.group_size for o in plan.assignments.values()} == {first}, name
        assert plan.total_bytes <= mixed.budget
        wide_plan = baseline(name, mixed, scores, block_of, group_size=512)
        assert {o.group_size for o in wide_plan.assignments.values()} == {512}, name
    optimum = solve(mixed)
    assert optimum.predicted_error <= solve(problem).predicted_error + 1e-12
