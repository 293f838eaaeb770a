"""The experiment end to end on a tiny real model, streamed: every plan at matched bytes,
measured for real, the non-additivity guard tuned on the validation split, report and figures
written; a budget's plans share a pass, progress only moves forward, and a rerun over the same
cache decomposes nothing."""

import dataclasses

import pytest

from compressor.pipeline.profile import ProfileConfig, run_profile
from compressor.pipeline.profile_store import FileProfileStore
from compressor.research.experiment import headline, run_experiment
from solver.strategies import STRATEGIES
from tests.helpers.profiles import TINY_PROFILE

# group 32 with 64 as the planner's extra choice: on 72-wide rows both are real choices
CFG = dataclasses.replace(ProfileConfig.from_dict(TINY_PROFILE), group_size=32,
                          extra_groups=(64,))


@pytest.fixture(scope="module")
def experiment(tiny_model, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    prof = run_profile(str(tiny_model), FileProfileStore(data / "profiles"), config=CFG)
    out = data / "report"
    reports: list[tuple[str, float]] = []
    result = run_experiment(str(tiny_model), prof, budgets=("4.5bpp", "6bpp"), out_dir=out,
                            eval_seqs=4, refine_rounds=1, cache_dir=data / "cache" / prof.key,
                            progress=lambda s, f: reports.append((s, f)))
    result["_reports"], result["_cache"] = reports, data / "cache" / prof.key
    return prof, result, out


def test_every_plan_fits_its_budget_and_is_measured(experiment):
    prof, result, _ = experiment
    assert result["original_ppl"] > 1
    for row in result["budgets"]:
        s = row["strategies"]
        assert {"optimal", "refined", "uniform", "uniform_best"} <= set(s) \
            <= {"optimal", "refined", "uniform_best", *STRATEGIES}
        for name, v in s.items():
            assert set(v) >= {"bytes", "ppl", "kl", "top1", "predicted"}, name
            assert 0 < v["bytes"] <= row["budget_bytes"], name
            assert v["kl"] >= 0 and 0 <= v["top1"] <= 1 and v["ppl"] > 1, name
        # the solver's plan is optimal under the model: no baseline predicts lower
        assert all(s["optimal"]["predicted"] <= v["predicted"] + 1e-12
                   for n, v in s.items() if n in (*STRATEGIES, "uniform_best"))
        # the plan heatmap records bits, rank and group size of every linear
        assert len(row["heatmap"]) == len(prof.linears)
        assert all(g in (32, 64) for _, _, g in row["heatmap"].values())


def test_guard_is_tuned_on_validation_and_never_worse_there(experiment):
    prof, result, _ = experiment
    blocks = prof.stats["num_blocks"]
    for row in result["budgets"]:
        r = row["refined"]
        assert r["evaluations"] == 1 + (blocks + 1)  # one round: each block, then the re-solve
        assert r["tune_kl_after"] <= r["tune_kl_before"]
        assert set(r["block_scale"]) == {str(b) for b in range(blocks)}
        assert all(v > 0 for v in r["block_scale"].values())


def test_headline_and_report(experiment):
    _, result, out = experiment
    assert result["headline_plan"] == "refined"
    for key in ("excess_ppl_closed_pct_solver_plan", "kl_gain_vs_uniform_pct_solver_plan",
                "max_uniform_excess_ppl_pct", "section2"):
        assert key in result
    sec = result["section2"]["bits"]
    assert set(sec) == {"2", "3", "4"}
    for b in ("2", "3", "4"):
        for label in ("q_only", "q_lr"):
            cos = sec[b][label]["mean_output_cos"]
            assert 0 < cos <= 1 + 1e-9
            # cosine and relative error describe the same output error: cos ≥ √(1 − t²)
            assert cos >= (1 - sec[b][label]["mean_rel_err"] ** 2) ** 0.5 - 0.05
    assert sec["2"]["q_only"]["mean_output_cos"] < sec["4"]["q_only"]["mean_output_cos"]
    for name in ("REPORT.md", "experiment.json", "frontier_kl.png", "frontier_ppl.png",
                 "plan_bits.png", "plan_ranks.png", "plan_groups.png",
                 "predicted_vs_measured.png"):
        assert (out / name).stat().st_size > 0, name
    assert "refined plan vs uniform" in (out / "REPORT.md").read_text()


def test_headline_arithmetic():
    def strat(ppl, kl):
        return {"ppl": ppl, "kl": kl}

    result = {"original_ppl": 10.0, "budgets": [
        {"budget": "a", "strategies": {"uniform": strat(12.0, 0.4), "optimal": strat(11.0, 0.2),
                                       "refined": strat(10.5, 0.1)}},
        {"budget": "b", "strategies": {"uniform": strat(10.05, 0.01),  # < 1 % excess: not counted
                                       "optimal": strat(10.06, 0.02),
                                       "refined": strat(10.04, 0.005)}}]}
    h = headline(result)
    assert h["headline_plan"] == "refined" and h["headline_budgets"] == ["a"]
    assert h["excess_ppl_closed_pct"] == pytest.approx(75.0)
    assert h["kl_gain_vs_uniform_pct"] == pytest.approx(75.0)
    assert h["excess_ppl_closed_pct_solver_plan"] == pytest.approx(50.0)
    assert h["kl_gain_vs_uniform_pct_solver_plan"] == pytest.approx(50.0)
    assert h["optimal_never_worse_than_uniform_kl"] is True
    assert h["optimal_never_worse_than_uniform_kl_solver_plan"] is False  # 0.02 > 0.01 at b


def test_passes_progress_and_cache(experiment, tiny_model):
    prof, result, _ = experiment
    # per budget: its 8 plans in one pass, the guard's round (plan + each block) in one, the
    # re-solve on the validation split, the refined plan on the test split; then section 2
    assert result["passes"] == 2 * 4 + 1
    fracs = [f for _, f in result["_reports"]]
    assert fracs == sorted(fracs) and 0 < fracs[0] and fracs[-1] == pytest.approx(1.0)
    assert len(fracs) == result["passes"] * prof.stats["num_blocks"]   # one per block a pass
    again = run_experiment(str(tiny_model), prof, budgets=("4.5bpp",), eval_seqs=4,
                           refine_rounds=0, cache_dir=result["_cache"])
    assert again["decompositions"] == 0 and again["passes"] == 2
    assert again["budgets"][0]["strategies"] == {
        k: v for k, v in result["budgets"][0]["strategies"].items() if k != "refined"}
    assert again["original_ppl"] == result["original_ppl"]
    assert again["section2"] == result["section2"]
    # without section 2: one pass fewer, its figures absent, the progress still ends at 1
    reports: list[float] = []
    bare = run_experiment(str(tiny_model), prof, budgets=("4.5bpp",), eval_seqs=4,
                          refine_rounds=0, cache_dir=result["_cache"], with_section2=False,
                          progress=lambda stage, frac: reports.append(frac))
    assert bare["section2"] is None and bare["passes"] == 1
    assert bare["budgets"][0]["strategies"] == again["budgets"][0]["strategies"]
    assert reports[-1] == pytest.approx(1.0)
