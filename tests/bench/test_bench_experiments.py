"""`bitplan bench profile --quick` and `bitplan bench e2e --quick` on a tiny random model (one
shared data dir, so it is profiled once): the figures each benchmark claims are there and sane,
the plans' bytes are their options' (recomputed here from the model's shapes) within their
budgets, and a larger budget's optimum is never predicted worse. Slow-ish: profiling the tiny
model from scratch is most of it."""

import math

import pytest

import solver
from solver.bytes import option_bytes
from tests.bench._run import bench, linear_shapes, model_params, positive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory, tiny_model):
    return tmp_path_factory.mktemp("bench-exp") / "data", {"BITPLAN_BENCH_MODEL": str(tiny_model)}


def test_bench_profile_quick(tiny_env, tiny_model):
    data, env = tiny_env
    fig = bench("profile", data, "--quick", env=env)
    assert fig["quick"] is True and fig["n_plans"] == len(fig["plans"]) == 6
    assert positive(fig["profile_s"], fig["uniform_compress_s"],
                    fig["profile_over_compress_time"], fig["original_ppl"])
    assert 0.9 < fig["fit_r2_heldout"] <= 1 and fig["heldout_points"] == 12
    # the tied embedding's Q-only fit at its rank-0 held-out points (5 and 8 bits)
    assert fig["vocab_heldout_points"] == 2 and 0.5 < fig["fit_r2_heldout_vocab"] <= 1
    assert 0 < fig["spearman_pred_vs_measured_kl"] <= 1, fig["plans"]
    by = {p["plan"]: p for p in fig["plans"]}
    assert by["uniform_b4_r0"]["measured_kl"] < by["uniform_b3_r0"]["measured_kl"]
    assert by["optimal_4.5bpp"]["bytes"] > by["optimal_3.5bpp"]["bytes"]
    # uniform plans: the kept bytes (norms, biases) plus each planned item's option bytes (the
    # blocks' linears and the tied embedding), nothing else
    shapes = linear_shapes(tiny_model)
    assert len(shapes) == len(linear_shapes(tiny_model, vocab=False)) + 1 == 15
    params = model_params(tiny_model)

    def linear_bytes(bits: int) -> int:
        return sum(option_bytes(m, n, solver.Option(bits, 0)) for m, n in shapes)

    fixed = by["uniform_b3_r0"]["bytes"] - linear_bytes(3)
    assert fixed == 4 * (params - sum(m * n for m, n in shapes)) > 0   # float32 kept tensors
    assert by["uniform_b4_r0"]["bytes"] == fixed + linear_bytes(4)
    for bpp in (3.5, 4.5):   # "Xbpp" = floor(X · every parameter / 8), kept bytes included
        assert by[f"optimal_{bpp}bpp"]["bytes"] <= math.floor(bpp * params / 8), bpp
    # a larger budget's optimum, and the optimum against a heuristic at its budget
    opt = by["optimal_4.5bpp"]["predicted_kl"]
    assert opt <= by["optimal_3.5bpp"]["predicted_kl"] * (1 + 1e-9)
    assert opt <= by["fidelity_4.5bpp"]["predicted_kl"] * (1 + 1e-9)
    assert by["fidelity_4.5bpp"]["bytes"] <= math.floor(4.5 * params / 8)
    for p in fig["plans"]:
        assert p["predicted_kl"] > 0 and p["measured_kl"] >= 0 and 0 <= p["top1"] <= 1, p
    assert len(fig["block_sensitivity"]) == len(fig["block_influence"]) == 2


def test_bench_e2e_quick(tiny_env):
    data, env = tiny_env
    fig = bench("e2e", data, "--quick", env=env)
    assert fig["quick"] is True and math.isfinite(fig["original_ppl"])
    assert [b["budget"] for b in fig["budgets"]] == ["3.5bpp"]
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
