"""Issue 12 item 11: a linear pinned to 16 bits is kept dense in fp16 (the option is added to its
menu, with its exact fp16 bytes and no error); an impossible pin names the options the linear
has; a budget above the largest useful plan is solved with a note, not silently."""

import pytest

from solver import AllocationProblem, Constraints, LinearMenu, Option, Plan, solve
from solver.bytes import fp16_bytes
from solver.synthetic import QWEN2_1_5B, synthetic_problem

DOWN = "model.layers.0.mlp.down_proj"


def _model(constraints=None, budget="3.2bpp"):
    problem, _, _ = synthetic_problem(QWEN2_1_5B, 24, layers=2, constraints=constraints)
    return problem.with_budget(budget)


@pytest.mark.parametrize("cons", [
    Constraints(pinned={DOWN: {"bits": 16}}),
    Constraints(pinned={"*.0.mlp.down_proj": Option(16, 0)}),
    Constraints(min_bits={DOWN: 16}),
], ids=["partial pin", "option pin", "min_bits 16"])
@pytest.mark.parametrize("budget", ["6bpp", "20bpp"])
def test_fp16_pin_solves_with_exact_bytes(cons, budget):
    problem = _model(cons, budget)
    plan = solve(problem)
    lin = problem.by_name[DOWN]
    assert plan.assignments[DOWN].bits == 16 and plan.assignments[DOWN].rank == 0
    assert plan.linear_bytes[DOWN] == fp16_bytes(lin.out_features, lin.in_features)
    assert plan.linear_errors[DOWN] == 0.0
    assert plan.total_bytes == problem.fixed_bytes + sum(plan.linear_bytes.values())
    assert problem.evaluate(plan.assignments) == (plan.total_bytes,
                                                  pytest.approx(plan.predicted_error))
    assert plan.total_bytes <= problem.budget
    # the other linears keep their quantized menus (nothing else went dense)
    assert all(o.bits <= 8 for n, o in plan.assignments.items() if n != DOWN)


def test_fp16_pin_is_only_added_where_asked():
    free, pinned = _model(), _model(Constraints(pinned={DOWN: {"bits": 16}}))
    assert [len(m.options) for m in pinned.linears if m.name != DOWN] == \
        [len(m.options) for m in free.linears if m.name != DOWN]
    assert len(pinned.by_name[DOWN].options) == len(free.by_name[DOWN].options) + 1


def _lin(name, options, errors, shape=(16, 16)):
    return LinearMenu(name, *shape, options, None, errors)


def test_no_option_error_lists_the_linears_options():
    lins = [_lin("a.q", [Option(3), Option(4, 8)], [1.0, 0.5])]
    with pytest.raises(ValueError) as info:
        AllocationProblem(lins, 0, None, Constraints(pinned={"a.*": {"bits": 7}})).feasibility()
    msg = str(info.value)
    assert "no option for a.q" in msg and "pinned" in msg and "'bits': 7" in msg
    assert "2 options" in msg and "3b/r0/fb4/g128" in msg and "4b/r8/fb4/g128" in msg
    # a long menu: the distinct values of every field, the first few options and a count
    big = [Option(b, r) for b in (2, 3, 4, 5, 6, 8) for r in (0, 8, 16, 32, 64)]
    lins = [_lin("a.k", big, [1.0] * len(big))]
    with pytest.raises(ValueError) as info:
        AllocationProblem(lins, 0, None, Constraints(max_bits={"a.k": 2},
                                                     min_bits=3)).feasibility()
    msg = str(info.value)
    assert "30 options" in msg and "bits 2,3,4,5,6,8" in msg and "ranks 0,8,16,32,64" in msg
    assert "(+" in msg and "more)" in msg and "min_bits 3" in msg and "max_bits 2" in msg
    assert len(msg) < 600


def test_budget_above_the_largest_plan_is_solved_with_a_note():
    problem = _model(budget="20bpp")
    plan = solve(problem)
    best = solve(problem.with_budget(None))
    assert plan.assignments == best.assignments and plan.total_bytes == best.total_bytes
    assert plan.total_bytes == problem.saturation_bytes() < problem.budget
    assert len(plan.notes) == 1
    note = plan.notes[0]
    assert "above the largest" in note and "more bytes buy nothing" in note
    assert f"{problem.saturation_bytes()} bytes" in note and f"{problem.budget} bytes" in note
    assert Plan.from_dict(plan.to_dict()).notes == plan.notes
    # at exactly the largest plan, or below it, there is nothing to say
    assert solve(problem.with_budget(problem.saturation_bytes())).notes == []
    assert solve(_model()).notes == []
    assert Plan.from_dict({k: v for k, v in plan.to_dict().items() if k != "notes"}).notes == []
