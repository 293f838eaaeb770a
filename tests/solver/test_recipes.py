"""YAML recipes: round trip is identity; the note's form imports; bad recipes fail clearly."""

import numpy as np
import pytest
import yaml

from solver import Option, solve
from solver.bytes import gguf_option
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


# -- the GGUF target: entries name a llama.cpp type ---------------------------------------------
GGUF_NAMES = ["model.embed_tokens", "model.layers.0.self_attn.q_proj",
              "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
              "model.layers.1.mlp.down_proj"]


def _gguf_plan(model, types):
    problem, _, _ = model
    plan = solve(problem)
    plan.assignments = {n: gguf_option(t) for n, t in zip(GGUF_NAMES, types, strict=True)}
    return plan


@pytest.mark.parametrize("types", [
    ["Q4_K"] * 5,
    ["Q8_0", "Q4_K", "Q6_K", "Q4_K", "Q6_K"],
    ["F16", "Q2_K", "Q3_K", "IQ4_NL", "Q5_0"],
])
def test_gguf_plan_round_trips_and_says_its_target(model, types):
    plan = _gguf_plan(model, types)
    text = plan_to_yaml(plan)
    doc = yaml.safe_load(text)
    assert doc["target"] == "gguf"
    # entries name their type only: the type decides bits, rank and group size
    assert all(set(e) == {"gguf_type"} for e in [doc["default"], *doc["pattern_overrides"].values()])
    assert plan_from_yaml(text, GGUF_NAMES) == plan.assignments


def test_a_native_plan_says_no_target():
    names = ["a.q", "a.k"]
    plan = solve(synthetic_problem(QWEN2_1_5B, 4, seed=1, bits_per_param=3.5)[0])
    plan.assignments = {"a.q": Option(3, 8), "a.k": Option(4)}
    text = plan_to_yaml(plan)
    assert "target" not in yaml.safe_load(text)
    assert plan_from_yaml(text, names) == plan.assignments


def test_hand_written_gguf_recipes():
    names = ["m.layers.0.q", "m.layers.0.down", "m.layers.1.q", "m.layers.1.down"]
    by_type = """
target: gguf
default: {gguf_type: Q4_K}
pattern_overrides:
  "*.down": {gguf_type: Q6_K}
  m.layers.1.down: {gguf_type: Q8_0, bits: 8, group_size: 32}   # agreeing fields are fine
"""
    want = {"m.layers.0.q": gguf_option("Q4_K"), "m.layers.0.down": gguf_option("Q6_K"),
            "m.layers.1.q": gguf_option("Q4_K"), "m.layers.1.down": gguf_option("Q8_0")}
    assert plan_from_yaml(by_type, names) == want
    # `target` may be left out: naming a type makes it a GGUF recipe
    assert plan_from_yaml(by_type.replace("target: gguf\n", ""), names) == want
    # a full exported option dict as default, a type override: the type decides its fields
    full = yaml.safe_dump({"default": gguf_option("Q4_K").to_dict(),
                           "pattern_overrides": {"*.down": {"gguf_type": "Q5_0"}}})
    assert plan_from_yaml(full, names)["m.layers.0.down"] == gguf_option("Q5_0")


@pytest.mark.parametrize("text, words", [
    ("target: gguf\ndefault: {bits: 4}", "a.q (default): no gguf_type in a target gguf recipe"),
    ("default: {bits: 4}\npattern_overrides: {'a.k': {gguf_type: Q4_K}}",
     "a.q (default): no gguf_type in a target gguf recipe"),
    ("target: native\ndefault: {gguf_type: Q4_K}", "gguf_type Q4_K in a target native recipe"),
    ("default: {gguf_type: Q4_K, bits: 3}", "bits=3 disagrees with gguf_type Q4_K"),
    ("default: {gguf_type: Q4_K}\npattern_overrides: {'a.k': {rank: 8}}",
     "a.k (default + pattern_overrides['a.k']): rank=8 disagrees with gguf_type Q4_K"),
    ("default: {gguf_type: Q4_K, factor_bits: 8}", "factor_bits=8 disagrees"),
    ("default: {gguf_type: Q9_K}", "gguf_type must be one of"),
    ("target: llama\ndefault: {gguf_type: Q4_K}", "target must be one of native, gguf"),
])
def test_bad_gguf_recipes_fail_clearly(text, words):
    with pytest.raises(ValueError) as info:
        plan_from_yaml(text, ["a.q", "a.k"])
    assert words in str(info.value)
