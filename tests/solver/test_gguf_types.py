"""The GGUF menu: ggml's block sizes, the row-length rule, GGUF options as solver options (exact
bytes, labels, pins, the dense F16 option) and the exact solver's optimum on GGUF menus against
brute force."""

import math

import numpy as np
import pytest

from solver import Constraints, LinearMenu, Option, solve
from solver.bytes import gguf_option, option_bytes
from solver.gguf_types import GGUF_TYPES, gguf_tensor_bytes, gguf_type, types_for_row
from solver.problem import AllocationProblem
from tests.solver.brute import best

# ggml-common.h: sizeof(block_*) per QK elements (QK4_0 = 32, QK_K = 256)
GGML_BLOCKS = {"Q4_0": (32, 2 + 16), "Q4_1": (32, 2 + 2 + 16), "Q5_0": (32, 2 + 4 + 16),
               "Q5_1": (32, 2 + 2 + 4 + 16), "Q8_0": (32, 2 + 32), "IQ4_NL": (32, 2 + 16),
               "Q2_K": (256, 16 + 64 + 2 + 2), "Q3_K": (256, 32 + 64 + 12 + 2),
               "Q4_K": (256, 2 + 2 + 12 + 128), "Q5_K": (256, 2 + 2 + 12 + 32 + 128),
               "Q6_K": (256, 128 + 64 + 16 + 2), "F16": (1, 2)}


def test_block_sizes_are_ggmls_and_bits_per_weight_follow():
    assert set(GGUF_TYPES) == set(GGML_BLOCKS)
    for name, (block, nbytes) in GGML_BLOCKS.items():
        t = gguf_type(name)
        assert (t.block, t.block_bytes) == (block, nbytes), name
    assert gguf_type("Q4_K").bits_per_weight == 4.5
    assert gguf_type("Q6_K").bits_per_weight == 6.5625
    assert gguf_type("Q8_0").bits_per_weight == 8.5


def test_rows_that_are_not_whole_super_blocks_get_only_the_32_element_types():
    # SmolLM2: 576-wide rows (q/k/v/o/gate/up, the embedding); down_proj reads 1536
    assert types_for_row(576) == ["F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL"]
    assert set(types_for_row(1536)) == set(GGUF_TYPES)
    assert types_for_row(33) == ["F16"]
    assert gguf_tensor_bytes("Q4_K", 576, 1536) == 576 * 6 * 144
    with pytest.raises(ValueError, match="Q4_K stores rows in blocks of 256; a row of 576"):
        gguf_tensor_bytes("Q4_K", 1536, 576)
    with pytest.raises(ValueError, match="unknown GGUF type 'Q9_K'"):
        gguf_type("Q9_K")


def test_a_gguf_option_counts_the_tensor_data_bytes_and_keeps_native_dicts_unchanged():
    o = gguf_option("Q5_0")
    assert (o.bits, o.rank, o.group_size, o.label) == (5, 0, 32, "Q5_0")
    assert option_bytes(1536, 576, o) == 1536 * 18 * 22
    assert Option.from_dict(o.to_dict()) == o
    assert "gguf_type" not in Option(3, 40).to_dict()       # native profile keys unchanged
    with pytest.raises(ValueError, match="a Q4_K option is bits=4, rank=0, group_size=256"):
        Option(4, 8, group_size=256, gguf_type="Q4_K")


def _gguf_menu(name: str, rows: int, cols: int, rng) -> LinearMenu:
    types = types_for_row(cols)
    # error falls with bits per weight, as measured errors do, plus per-linear noise
    errors = [0.0 if t == "F16" else rng.uniform(0.5, 2.0) * 2.0 ** (-2 * gguf_type(t).bits)
              for t in types]
    return LinearMenu(name, rows, cols, [gguf_option(t) for t in types], errors=errors)


@pytest.mark.parametrize("seed", range(6))
def test_exact_solver_is_optimal_on_gguf_menus(seed):
    rng = np.random.default_rng(seed)
    lins = [_gguf_menu(f"b{i}.down", 64, 512, rng) for i in range(2)] + \
           [_gguf_menu(f"b{i}.q", 96, 96, rng) for i in range(3)]
    base = AllocationProblem(lins, fixed_bytes=100)
    lo, hi = base.feasibility()
    for frac in (0.0, 0.15, 0.4, 0.8):
        problem = base.with_budget(lo + math.floor(frac * (hi - lo)))
        plan = solve(problem)
        want = best(problem)
        assert plan.total_bytes <= problem.budget
        assert plan.predicted_error == pytest.approx(want[1], rel=1e-9, abs=1e-15)
        for name, opt in plan.assignments.items():
            assert opt.gguf_type and plan.linear_bytes[name] == option_bytes(
                problem.by_name[name].out_features, problem.by_name[name].in_features, opt)


def test_pins_and_the_dense_rule_speak_gguf():
    rng = np.random.default_rng(0)
    lins = [_gguf_menu("b0.q", 64, 64, rng), _gguf_menu("b0.down", 64, 256, rng)]
    pinned = AllocationProblem(lins, constraints=Constraints(pinned={"*.q": {"gguf_type": "Q8_0"}}),
                               budget=10**9)
    assert solve(pinned).assignments["b0.q"] == gguf_option("Q8_0")
    dense = AllocationProblem(lins, constraints=Constraints(min_bits={"*.down": 16}),
                              budget=10**9)
    assert solve(dense).assignments["b0.down"] == gguf_option("F16")
    with pytest.raises(ValueError, match="constraints leave no option for b0.q"):
        _ = AllocationProblem(lins, constraints=Constraints(
            pinned={"*.q": {"gguf_type": "Q4_K"}})).items
