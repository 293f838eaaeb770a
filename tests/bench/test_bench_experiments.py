"""`bitplan bench profile --quick` and `bitplan bench e2e --quick` on a tiny random model (one
shared data dir, so it is profiled once): the figures each benchmark claims are there and sane.
Slow-ish: profiling the tiny model from scratch is most of it."""

import math

import pytest

from tests.bench._run import bench, positive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory, tiny_model):
    return tmp_path_factory.mktemp("bench-exp") / "data", {"BITPLAN_BENCH_MODEL": str(tiny_model)}


def test_bench_profile_quick(tiny_env):
    data, env = tiny_env
    fig = bench("profile", data, "--quick", env=env)
    assert fig["quick"] is True and fig["n_plans"] == len(fig["plans"]) == 6
    assert positive(fig["profile_s"], fig["uniform_compress_s"],
                    fig["profile_over_compress_time"], fig["original_ppl"])
    assert 0.9 < fig["fit_r2_heldout"] <= 1 and fig["heldout_points"] == 12
    assert 0 < fig["spearman_pred_vs_measured_kl"] <= 1, fig["plans"]
    by = {p["plan"]: p for p in fig["plans"]}
    assert by["uniform_b4_r0"]["measured_kl"] < by["uniform_b3_r0"]["measured_kl"]
    assert by["optimal_4.5bpp"]["bytes"] > by["optimal_3.5bpp"]["bytes"]
    for p in fig["plans"]:
        assert p["predicted_kl"] > 0 and p["measured_kl"] >= 0 and 0 <= p["top1"] <= 1, p
    assert len(fig["block_sensitivity"]) == len(fig["block_influence"]) == 2


def test_bench_e2e_quick(tiny_env):
    data, env = tiny_env
    fig = bench("e2e", data, "--quick", env=env)
    assert fig["quick"] is True and math.isfinite(fig["original_ppl"])
    assert [b["budget"] for b in fig["budgets"]] == ["3.25bpp"]
    row = fig["budgets"][0]
    strat = row["strategies"]
    assert {"optimal", "uniform"} <= set(strat) and row["refined"] is None
    for name, s in strat.items():
        assert s["bytes"] <= row["budget_bytes"], name
        assert s["kl"] >= 0 and s["predicted"] > 0 and 0 <= s["top1"] <= 1, (name, s)
    assert fig["optimal_never_worse_than_uniform_kl"] is True
    assert strat["optimal"]["predicted"] <= strat["uniform"]["predicted"]
    assert fig["kl_gain_vs_uniform_pct_all_budgets"] >= 0
    for bits in ("2", "3", "4"):
        s2 = fig["section2"]["bits"][bits]
        assert s2["q_lr"]["mean_rel_err"] < s2["q_only"]["mean_rel_err"], bits
    assert fig["decompositions"] > 0 and fig["report"].endswith("REPORT.md")
