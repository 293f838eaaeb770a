"""Option fields have one validator (solver.bytes.check_option_fields): constraint pins, via the
API's validator or built directly, and YAML recipes refuse a bad field in the same words."""

import pytest
import yaml

from solver import Constraints, Option
from solver.bytes import (
    MAX_GROUP_SIZE,
    MAX_RANK,
    OPTION_FIELDS,
    check_option_fields,
    field_problem,
)
from solver.constraints import ConstraintError, validate_constraints
from solver.recipes import plan_from_yaml

GOOD = {"bits": [2, 3, 8, 16], "factor_bits": [2, 8, 16], "rank": [0, 1, MAX_RANK],
        "group_size": [1, 128, MAX_GROUP_SIZE], "symmetric": [True, False],
        "gguf_type": ["", "Q4_K", "IQ4_NL", "F16"], "ct": [True, False]}
BAD = [("bits", 1), ("bits", 9), ("bits", 15), ("bits", 99), ("bits", "four"), ("bits", 4.0),
       ("bits", True), ("factor_bits", 1), ("factor_bits", 17), ("rank", -8),
       ("rank", MAX_RANK + 1), ("rank", True), ("group_size", 0), ("group_size", -128),
       ("group_size", MAX_GROUP_SIZE + 1), ("symmetric", "yes"), ("symmetric", 1),
       ("gguf_type", "Q9_K"), ("gguf_type", "q4_k"), ("gguf_type", 4), ("ct", "yes"),
       ("ct", 1)]


def test_every_option_field_has_a_rule_and_its_edges_are_accepted():
    assert set(GOOD) == set(OPTION_FIELDS)
    for field, values in GOOD.items():
        for v in values:
            assert field_problem(field, v) is None, (field, v)
    opt = Option(16, MAX_RANK, 2, 1, True)
    assert check_option_fields(opt.to_dict(), "x") == opt.to_dict()
    assert check_option_fields({"rank": 8}, "x") == {"rank": 8}   # partial is fine


@pytest.mark.parametrize("field, value", BAD)
def test_constraints_and_recipes_refuse_a_bad_field_in_the_same_words(field, value):
    fields = {"bits": 4, field: value}
    said = field_problem(field, value)
    assert said.startswith(f"{field} must be ") and said.endswith(f", got {value!r}")
    with pytest.raises(ConstraintError) as api:
        validate_constraints({"pinned": {"a.q": fields}})
    with pytest.raises(ConstraintError) as built:
        Constraints(pinned={"a.q": fields})
    with pytest.raises(ValueError) as default:
        plan_from_yaml(yaml.safe_dump({"default": fields}), ["a.q"])
    with pytest.raises(ValueError) as override:
        plan_from_yaml(yaml.safe_dump({"default": {"bits": 4},
                                       "pattern_overrides": {"a.*": fields}}), ["a.q"])
    assert str(api.value) == str(built.value) == f"pinned['a.q']: {said}"
    assert str(default.value) == f"a.q (default): {said}"
    assert str(override.value) == f"a.q (default + pattern_overrides['a.*']): {said}"


def test_unknown_fields_and_non_mappings_are_refused_in_the_same_words():
    known = ", ".join(OPTION_FIELDS)
    cases = [({"bits": 4, "rnak": 3}, f": unknown option fields ['rnak'] (known: {known})"),
             (4, " must be a mapping of option fields, got 4")]
    for fields, tail in cases:
        with pytest.raises(ConstraintError, match="^pinned") as api:
            validate_constraints({"pinned": {"a.q": fields}})
        with pytest.raises(ValueError, match="^default") as recipe:
            plan_from_yaml(yaml.safe_dump({"default": fields}), ["a.q"])
        assert str(api.value) == f"pinned['a.q']{tail}"
        assert str(recipe.value) == f"default{tail}"
    with pytest.raises(ConstraintError) as built:
        Constraints(pinned={"a.q": {"bits": 4, "rnak": 3}})
    assert str(built.value) == f"pinned['a.q']{cases[0][1]}"


def test_bounds_and_rank_lists_use_the_field_rules():
    with pytest.raises(ConstraintError) as lo:
        validate_constraints({"min_bits": 3.5})
    with pytest.raises(ConstraintError) as hi:
        validate_constraints({"max_bits": {"a.*": 99}})
    with pytest.raises(ConstraintError) as ranks:
        validate_constraints({"allowed_ranks": [0, -3]})
    assert str(lo.value) == f"min_bits: {field_problem('bits', 3.5)}"
    assert str(hi.value) == f"max_bits['a.*']: {field_problem('bits', 99)}"
    assert str(ranks.value) == f"allowed_ranks: {field_problem('rank', -3)}"
    validate_constraints({"min_bits": 16, "max_bits": 16, "allowed_ranks": [0, MAX_RANK]})
