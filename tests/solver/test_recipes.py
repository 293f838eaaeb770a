"""YAML recipes: round trip is identity; the note's form imports; bad recipes fail clearly."""

import numpy as np
import pytest

from solver import Option, solve
from solver.recipes import plan_from_yaml, plan_to_yaml
from solver.strategies import baseline
from solver.synthetic import QWEN2_1_5B, synthetic_problem

NOTE_ULTRA = """
default: {bits: 3, rank: 40, factor_bits: 4, group_size: 128}
pattern_overrides:
  "model.layers.27.*": {rank: 256}  # fidelity 0.308 (outlier)
  "model.layers.0.*": {rank: 256}   # fidelity 0.199
  "model.layers.1.*": {rank: 128}   # fidelity 0.166
  "model.layers.25.*": {rank: 128}  # fidelity 0.164
"""


@pytest.fixture(scope="module")
def model():
    return synthetic_problem(QWEN2_1_5B, 40, seed=31, bits_per_param=3.5)


def test_round_trip_of_solved_and_baseline_plans(model):
    problem, scores, block_of = model
    for plan in (solve(problem), baseline("ultra", problem, scores, block_of),
                 baseline("fidelity", problem, scores, block_of)):
        text = plan_to_yaml(plan)
        assert plan_from_yaml(text, problem.names) == plan.assignments
        assert len(text.splitlines()) < len(problem.names)  # compacted


def test_round_trip_of_random_assignments(model):
    problem, _, _ = model
    rng = np.random.default_rng(0)
    pool = [Option(b, r, fb) for b in (2, 3, 4) for r in (0, 64) for fb in (4, 8)]
    for k in (1, 2, 5, len(pool)):
        names = problem.names[: int(rng.integers(1, len(problem.names)))]
        assign = {n: pool[int(rng.integers(0, k))] for n in names}
        plan = solve(problem)
        plan.assignments = assign
        assert plan_from_yaml(plan_to_yaml(plan), names) == assign


def test_ultra_baseline_compacts_to_block_globs(model):
    problem, scores, block_of = model
    text = plan_to_yaml(baseline("ultra", problem, scores, block_of))
    assert "pattern_overrides:" in text and "default:" in text
    assert sum(".*:" in line for line in text.splitlines()) >= 2


def test_note_recipe_imports():
    names = [n for n, *_ in QWEN2_1_5B.linears()]
    plan = plan_from_yaml(NOTE_ULTRA, names)
    assert plan["model.layers.27.mlp.down_proj"] == Option(3, 256, 4, 128)
    assert plan["model.layers.1.self_attn.q_proj"].rank == 128
    assert plan["model.layers.10.self_attn.q_proj"] == Option(3, 40, 4, 128)


def test_last_matching_override_wins_and_replaces_fields():
    text = """
default: {bits: 3, rank: 40}
pattern_overrides:
  "a.*": {rank: 256, bits: 4}
  "a.k": {rank: 8}
"""
    got = plan_from_yaml(text, ["a.q", "a.k", "b.q"])
    assert got == {"a.q": Option(4, 256), "a.k": Option(3, 8), "b.q": Option(3, 40)}


@pytest.mark.parametrize("text, words", [
    ("default: {bits: 3}\npattern_overrides: {'x.*': {rank: 1}}", "matches no linear"),
    ("default: {bits: 3, rnak: 2}", "unknown option fields"),
    ("default: {rank: 2}", "no bits"),
    ("default: {bits: 1}", "bits must be"),
    ("- 1\n- 2", "must be a mapping"),
    ("default: {bits: 3}\nextra: 1", "unknown keys"),
    ("default: [", "not valid YAML"),
])
def test_bad_recipes(text, words):
    with pytest.raises(ValueError, match=words):
        plan_from_yaml(text, ["a.q"])
