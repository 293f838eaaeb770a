"""Constraints are honoured, resolved exactly (brute force) and misuse fails clearly."""

import numpy as np
import pytest

from solver import AllocationProblem, Constraints, LinearMenu, Option, solve, tie_per_block
from solver.synthetic import QWEN2_1_5B, random_problem, synthetic_problem
from tests.solver import brute


def _model(layers=3, n_options=24, bpp=3.2, constraints=None, seed=0):
    problem, scores, block_of = synthetic_problem(QWEN2_1_5B, n_options, seed=seed,
                                                  layers=layers, constraints=constraints)
    return problem.with_budget(f"{bpp}bpp")


def test_min_and_max_bits_are_honoured():
    cons = Constraints(min_bits=3, max_bits={"*.mlp.*": 4})
    plan = solve(_model(constraints=cons, bpp=3.6))
    for name, opt in plan.assignments.items():
        assert opt.bits >= 3
        if ".mlp." in name:
            assert opt.bits <= 4


def test_pins_allowed_ranks_and_partial_pins():
    pin = Option(4, 64)
    cons = Constraints(pinned={"model.layers.0.*": pin, "model.layers.2.mlp.*": {"rank": 0}},
                       allowed_ranks={"model.layers.1.*": [0, 32]})
    plan = solve(_model(constraints=cons, bpp=3.4))
    for name, opt in plan.assignments.items():
        if name.startswith("model.layers.0."):
            assert opt == pin
        if name.startswith("model.layers.2.mlp."):
            assert opt.rank == 0
        if name.startswith("model.layers.1."):
            assert opt.rank in (0, 32)


def test_ties_share_one_option():
    base = _model()
    ties = tie_per_block(base.names)
    assert len(ties) == 3 and all(len(t) == 3 for t in ties)
    plan = solve(_model(constraints=Constraints(ties=ties)))
    for group in ties:
        assert len({plan.assignments[n] for n in group}) == 1
    # a tied problem has fewer items, same linears
    assert len(_model(constraints=Constraints(ties=ties)).items) == len(base.items) - 6


def test_constrained_optimum_equals_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(40):
        problem = random_problem(rng, 6, 4)
        names = problem.names
        cons = Constraints(
            min_bits={names[0]: 3}, max_bits={"*lin2": 6},
            allowed_ranks={names[1]: [0, 8, 16]} if trial % 2 else None,
            ties=[[names[3], names[4]]] if trial % 3 else [])
        try:
            constrained = AllocationProblem(problem.linears, problem.fixed_bytes, None, cons)
            lo, hi = constrained.feasibility()
        except ValueError:
            continue  # the random menus may leave nothing: covered by its own test
        constrained = constrained.with_budget(int(lo + rng.uniform(0, 1) * (hi - lo)))
        want = brute.best(constrained)
        plan = solve(constrained)
        assert plan.predicted_error == pytest.approx(want[1], abs=1e-9)
        assert plan.total_bytes <= constrained.budget


def test_feasibility_reflects_constraints():
    free = _model()
    floor = _model(constraints=Constraints(min_bits=4))
    assert floor.feasibility()[0] > free.feasibility()[0]
    assert floor.feasibility()[1] == free.feasibility()[1]


def _lin(name, options, errors):
    return LinearMenu(name, 16, 16, options, None, errors)


def test_glob_matching_nothing_is_a_clear_error():
    lins = [_lin("a.q", [Option(3), Option(4)], [1.0, 0.5])]
    for cons in (Constraints(min_bits={"b.*": 3}), Constraints(ties=[["a.q", "zzz"]]),
                 Constraints(pinned={"nope": {"rank": 0}})):
        with pytest.raises(ValueError, match="matches no linear"):
            AllocationProblem(lins, 0, 10_000, cons).feasibility()


def test_impossible_constraints_are_clear_errors():
    lins = [_lin("a.q", [Option(3), Option(4)], [1.0, 0.5]),
            _lin("a.k", [Option(5), Option(6)], [1.0, 0.5])]
    with pytest.raises(ValueError, match="no option for a.q"):
        AllocationProblem(lins, 0, None, Constraints(min_bits=5)).feasibility()
    with pytest.raises(ValueError, match="no allowed option in common"):
        AllocationProblem(lins, 0, None, Constraints(ties=[["a.*"]])).feasibility()
    with pytest.raises(ValueError, match="unknown option fields"):
        Constraints(pinned={"a.q": {"rnak": 3}})


def test_constraints_dict_round_trip():
    cons = Constraints(min_bits=3, pinned={"x.*": Option(4, 8), "y": {"rank": 0}},
                       allowed_ranks=[0, 64], ties=[["a", "b"]])
    again = Constraints.from_dict(cons.to_dict())
    assert again.to_dict() == cons.to_dict()
    with pytest.raises(ValueError, match="unknown constraint keys"):
        Constraints.from_dict({"min_bit": 3})


def test_menu_validation():
    with pytest.raises(ValueError, match="errors are required"):
        LinearMenu("a", 4, 4, [Option(3)])
    with pytest.raises(ValueError, match="listed twice"):
        _lin("a", [Option(3), Option(3)], [1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        _lin("a", [Option(3)], [float("nan")])
    with pytest.raises(ValueError, match="must match"):
        _lin("a", [Option(3)], [1.0, 2.0])
    with pytest.raises(ValueError, match="duplicate linear names"):
        AllocationProblem([_lin("a", [Option(3)], [1.0])] * 2)
