"""`bitplan bench solver --quick`: the exact solver's plan is CP-SAT's proven optimum, greedy is
never better, the note's hand-made plans are never better than the optimum (their printed ratios
recomputed here on the same seeded instance), and every timing ratio is the ratio of the
positive times printed beside it."""

import pytest

from bench.solver import BUDGET_BPP, QUICK_LAYERS, QUICK_SHAPE, SWEEP_BPP
from solver import Method, solve
from solver.strategies import all_baselines
from solver.synthetic import QWEN2_1_5B, synthetic_problem
from tests.bench._run import bench, positive


def test_bench_solver_quick(tmp_path):
    fig = bench("solver", tmp_path, "--quick", "--cpsat-time-limit", "20")
    assert fig["quick"] is True and set(fig) >= {"a", "cpu_count"} and "b" not in fig
    a = fig["a"]
    # the quick instance: Qwen2-1.5B's widths cut to 2 blocks × 7 linears, 16 options each,
    # and the tied embedding (a planned item since issue 22, its menu the Q-only options), its
    # vocabulary cut by the same 2/28
    assert QUICK_LAYERS == 2 and QUICK_SHAPE.vocab == QWEN2_1_5B.vocab * 2 // 28
    assert (QUICK_SHAPE.hidden, QUICK_SHAPE.intermediate) == (1536, 8960)
    problem, scores, block_of = synthetic_problem(QUICK_SHAPE, 16, seed=0, layers=QUICK_LAYERS,
                                                  bits_per_param=BUDGET_BPP)
    assert (a["linears"], a["options"]) == (len(problem.linears), 16) == (2 * 7 + 1, 16)
    assert [lin.name for lin in problem.linears if lin.name not in block_of] == [
        "model.embed_tokens"]
    assert a["budget_bytes"] == problem.budget and a["budget_bpp"] == BUDGET_BPP
    assert a["cpsat_time_limit_s"] == 20
    assert a["cpsat_optimal"] and a["exact_matches_cpsat"] and a["exact_consistent_with_cpsat_bound"]
    assert a["exact_better_than_cpsat_pct"] == pytest.approx(0, abs=1e-6)
    assert a["greedy_gap_pct"] >= 0 and a["greedy_certified_gap_pct"] >= a["greedy_gap_pct"] - 1e-6
    optimum = solve(problem, Method.EXACT).predicted_error
    want = {name: plan.predicted_error / optimum
            for name, plan in all_baselines(problem, scores, block_of).items()}
    assert want and set(a["baseline_error_vs_optimum"]) == set(want)
    for name, ratio in a["baseline_error_vs_optimum"].items():
        assert ratio >= 1 - 1e-9 and ratio == pytest.approx(want[name], abs=1e-4), name
    assert positive(a["exact_ms"], a["cpsat_ms"], a["greedy_ms"], a["frontier_ms"],
                    *a["exact_ms_sweep"].values())
    assert set(a["exact_ms_sweep"]) == {f"{b}bpp" for b in SWEEP_BPP}
    for key, ms in (("exact_vs_cpsat", a["exact_ms"]), ("greedy_vs_cpsat", a["greedy_ms"]),
                    ("frontier_vs_cpsat", a["frontier_ms"])):   # times rounded to 10 µs
        assert a[key] == pytest.approx(ms / a["cpsat_ms"], rel=0.02, abs=1e-4), key
    assert a["frontier_points"] > 1
