"""`bitplan bench solver --quick`: the exact solver's plan is CP-SAT's proven optimum, greedy is
never better, the note's hand-made plans are never better than the optimum, and every timing
ratio is a positive, finite number measured in this run."""

import pytest

from tests.bench._run import bench, positive


def test_bench_solver_quick(tmp_path):
    fig = bench("solver", tmp_path, "--quick", "--cpsat-time-limit", "20")
    assert fig["quick"] is True and set(fig) >= {"a", "cpu_count"}
    a = fig["a"]
    assert a["linears"] == 14 and a["options"] == 16
    assert a["cpsat_time_limit_s"] == 20
    assert a["cpsat_optimal"] and a["exact_matches_cpsat"] and a["exact_consistent_with_cpsat_bound"]
    assert a["exact_better_than_cpsat_pct"] == pytest.approx(0, abs=1e-6)
    assert a["greedy_gap_pct"] >= 0 and a["greedy_certified_gap_pct"] >= a["greedy_gap_pct"] - 1e-6
    assert all(r >= 1 - 1e-9 for r in a["baseline_error_vs_optimum"].values()), a
    assert a["baseline_error_vs_optimum"]
    assert positive(a["exact_ms"], a["cpsat_ms"], a["greedy_ms"], a["frontier_ms"],
                    a["exact_vs_cpsat"], a["greedy_vs_cpsat"], a["frontier_vs_cpsat"],
                    *a["exact_ms_sweep"].values())
    assert a["frontier_points"] > 1
